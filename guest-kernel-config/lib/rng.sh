# Guest helper for the virtio-rng check; sourced by scenarios.
# rng_read BYTES: waits for /dev/hwrng, reads BYTES from it (a multiple of 64) and
# reports the current hwrng, the bytes read and the distinct byte values in 64 (RNG).
rng_read() {
    wait_for /dev/hwrng 30 || fail no-/dev/hwrng
    current=$(cat /sys/class/misc/hw_random/rng_current)
    got=$(dd if=/dev/hwrng bs=64 count=$(($1 / 64)) 2>/dev/null | wc -c)
    distinct=$(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr ' ' '\n' |
               grep -v '^$' | sort -u | wc -l)
    mark RNG current="$current" bytes="$got" distinct="$distinct"
}
