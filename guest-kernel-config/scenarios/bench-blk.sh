# Scenario "bench-blk": sequential direct-I/O throughput of a virtio-blk disk.
# Env: DISK, TESTS (space-separated OP:BLOCK:BYTES, OP read or write).
# Each test is announced by BENCH_GO and reports BENCH op= bs= bytes= centis=
# (elapsed guest time, 1/100 s).
wait_for "/dev/$DISK" 30 || fail "no-/dev/$DISK"
uptime_cs() { tr -d . < /proc/uptime | cut -d' ' -f1; }
for t in $TESTS; do
    op=${t%%:*}; rest=${t#*:}; bs=${rest%%:*}; bytes=${rest#*:}
    count=$((bytes / bs))
    mark BENCH_GO op="$op" bs="$bs"
    if [ "$op" = read ]; then
        t0=$(uptime_cs)
        dd if="/dev/$DISK" of=/dev/null bs="$bs" count="$count" iflag=direct 2>/dev/null ||
            fail "read-$bs"
    else
        t0=$(uptime_cs)
        dd if=/dev/zero of="/dev/$DISK" bs="$bs" count="$count" oflag=direct 2>/dev/null ||
            fail "write-$bs"
    fi
    t1=$(uptime_cs)
    mark BENCH op="$op" bs="$bs" bytes="$bytes" centis=$((t1 - t0))
done
true
