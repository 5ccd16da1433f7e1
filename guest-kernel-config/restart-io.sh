#!/bin/busybox sh
# restart-io.sh DISK JOBS COUNT: the backend-restart test's guest I/O. JOBS writers
# run at once (up to JOBS requests in flight); each writes COUNT 64 KiB blocks of
# random data (made and summed beforehand, so that the writers spend their time in
# I/O) to its own part of /dev/DISK with direct I/O, one after the other, and
# reads each back. Every completion prints
#   RIO BLOCK ok|WERR|RERR UPTIME
# (the gaps between the UPTIMEs are the pauses the guest saw). The sha256 of every
# block is in /tmp/rio/BLOCK. At the end each block read back, and each block read
# once more from the disk, is compared with it; the last line is
#   RIO_END blocks=N verified=N bad=N errors=N
# and the exit status is 0 when every block verified twice and no I/O failed.
disk=/dev/$1 jobs=$2 count=$3
bs=65536
rm -rf /tmp/rio && mkdir -p /tmp/rio

up() { cut -d' ' -f1 /proc/uptime; }
sum() { sha256sum | cut -d' ' -f1; }

j=0
while [ "$j" -lt "$jobs" ]; do
    head -c $((count * bs)) /dev/urandom > "/tmp/rio/data$j"
    i=0
    while [ "$i" -lt "$count" ]; do
        dd if="/tmp/rio/data$j" bs=$bs skip="$i" count=1 2>/dev/null | sum \
            > "/tmp/rio/$((j * count + i))"
        i=$((i + 1))
    done
    j=$((j + 1))
done

writer() {
    j=$1 i=0
    while [ "$i" -lt "$count" ]; do
        b=$((j * count + i))
        if ! dd if="/tmp/rio/data$j" of="$disk" bs=$bs skip="$i" seek="$b" count=1 \
                oflag=direct conv=notrunc 2>/dev/null; then
            echo "RIO $b WERR $(up)"; echo "$b" >> /tmp/rio/errors
        elif ! dd if="$disk" of="/tmp/rio/back$b" bs=$bs skip="$b" count=1 iflag=direct \
                2>/dev/null; then
            echo "RIO $b RERR $(up)"; echo "$b" >> /tmp/rio/errors
        else
            echo "RIO $b ok $(up)"
        fi
        i=$((i + 1))
    done
}

echo "RIO_START $(up)"
j=0
while [ "$j" -lt "$jobs" ]; do  # their lines reach the console as they come
    writer "$j" &
    j=$((j + 1))
done
wait

blocks=0 verified=0 bad=0 errors=0
for f in /tmp/rio/[0-9]*; do  # the sums (data*, back*, errors are not blocks)
    [ -e "$f" ] || continue
    b=${f##*/}
    blocks=$((blocks + 1))
    want=$(cat "$f")
    if ! dd if="$disk" of=/tmp/rio/check bs=$bs skip="$b" count=1 iflag=direct 2>/dev/null
    then
        errors=$((errors + 1)); echo "RIO_CHECK $b RERR"
    elif [ "$(sum < /tmp/rio/check)" != "$want" ]; then
        bad=$((bad + 1)); echo "RIO_CHECK $b BAD on the disk"
    elif [ ! -e "/tmp/rio/back$b" ] || [ "$(sum < "/tmp/rio/back$b")" != "$want" ]; then
        bad=$((bad + 1)); echo "RIO_CHECK $b BAD as read back"
    else
        verified=$((verified + 1))
    fi
done
[ -e /tmp/rio/errors ] && errors=$((errors + $(wc -l < /tmp/rio/errors)))
echo "RIO_END blocks=$blocks verified=$verified bad=$bad errors=$errors"
[ "$bad" -eq 0 ] && [ "$errors" -eq 0 ] && [ "$verified" -eq "$blocks" ]
