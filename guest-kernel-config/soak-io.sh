#!/bin/busybox sh
# soak-io.sh DISK BLOCKS SECONDS: the soak's guest I/O. For SECONDS, writes a
# random 4 KiB block of random data at a random one of the first BLOCKS blocks of
# /dev/DISK with direct I/O, reads it back and compares; a write or read the host
# made fail (a revoked mapping, a stage-2 fault) is retried until it succeeds.
# The last sha256 written to each block is kept in /tmp/soak/BLOCK. At the end
# every block written is read back once more and compared. Prints one line:
#   SOAK writes=N reads=N write_retries=N read_retries=N verified=N bad=N
# and exits 0 when nothing was lost or corrupted.
disk=/dev/$1 blocks=$2 seconds=$3
mkdir -p /tmp/soak
writes=0 reads=0 wretries=0 rretries=0 bad=0

rand() { od -An -N4 -tu4 /dev/urandom | tr -d ' '; }

# read_block N: /tmp/rb holds block N (retried until the read succeeds).
read_block() {
    n=0
    until dd if="$disk" of=/tmp/rb bs=4096 skip="$1" count=1 iflag=direct 2>/dev/null &&
          [ "$(wc -c < /tmp/rb)" -eq 4096 ]; do
        n=$((n + 1)); rretries=$((rretries + 1))
        [ "$n" -gt 200 ] && { echo "SOAK_FAIL read of block $1 never succeeded"; exit 3; }
        sleep 0.05
    done
    reads=$((reads + 1))
}

end=$(( $(cut -d. -f1 /proc/uptime) + seconds ))
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
    i=$(( $(rand) % blocks ))
    head -c 4096 /dev/urandom > /tmp/wb
    sum=$(sha256sum < /tmp/wb | cut -d' ' -f1)
    n=0
    until dd if=/tmp/wb of="$disk" bs=4096 seek="$i" count=1 oflag=direct conv=notrunc \
            2>/dev/null; do
        n=$((n + 1)); wretries=$((wretries + 1))
        [ "$n" -gt 200 ] && { echo "SOAK_FAIL write of block $i never succeeded"; exit 3; }
        sleep 0.05
    done
    writes=$((writes + 1))
    echo "$sum" > "/tmp/soak/$i"
    read_block "$i"
    if [ "$(sha256sum < /tmp/rb | cut -d' ' -f1)" != "$sum" ]; then
        bad=$((bad + 1)); echo "SOAK_BAD block $i read back differs"
    fi
done

verified=0
for f in /tmp/soak/*; do
    [ -e "$f" ] || continue
    i=${f##*/}
    read_block "$i"
    if [ "$(sha256sum < /tmp/rb | cut -d' ' -f1)" = "$(cat "$f")" ]; then
        verified=$((verified + 1))
    else
        bad=$((bad + 1)); echo "SOAK_BAD block $i differs at the end"
    fi
done
echo "SOAK writes=$writes reads=$reads write_retries=$wretries read_retries=$rretries" \
     "verified=$verified bad=$bad"
[ "$bad" -eq 0 ]
