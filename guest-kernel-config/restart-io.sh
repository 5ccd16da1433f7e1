#!/bin/busybox sh
# restart-io.sh DISK JOBS COUNT: the backend-restart test's guest I/O. JOBS writers
# run at once (JOBS requests in flight); each writes COUNT fresh 64 KiB blocks of
# random data to its own part of /dev/DISK with direct I/O, one after the other,
# reads each back and compares sha256. Every block's sum goes to /tmp/rio/BLOCK and
# every completion prints
#   RIO BLOCK ok|BAD|WERR|RERR UPTIME
# (the gaps between the UPTIMEs are the pauses the guest saw). At the end every
# block is read back once more; the last line is
#   RIO_END blocks=N verified=N bad=N errors=N
# and the exit status is 0 when every block verified.
disk=/dev/$1 jobs=$2 count=$3
bs=65536
rm -rf /tmp/rio && mkdir -p /tmp/rio

up() { cut -d' ' -f1 /proc/uptime; }

writer() {
    j=$1 i=0
    while [ "$i" -lt "$count" ]; do
        b=$((j * count + i))
        head -c $bs /dev/urandom > "/tmp/rio/w$j"
        sum=$(sha256sum < "/tmp/rio/w$j" | cut -d' ' -f1)
        echo "$sum" > "/tmp/rio/$b"
        if ! dd if="/tmp/rio/w$j" of="$disk" bs=$bs seek="$b" count=1 oflag=direct \
                conv=notrunc 2>/dev/null; then
            echo "RIO $b WERR $(up)"; echo "$b" >> /tmp/rio/errors
        elif ! dd if="$disk" of="/tmp/rio/r$j" bs=$bs skip="$b" count=1 iflag=direct \
                2>/dev/null; then
            echo "RIO $b RERR $(up)"; echo "$b" >> /tmp/rio/errors
        elif [ "$(sha256sum < "/tmp/rio/r$j" | cut -d' ' -f1)" = "$sum" ]; then
            echo "RIO $b ok $(up)"
        else
            echo "RIO $b BAD $(up)"
        fi
        i=$((i + 1))
    done
}

j=0
while [ "$j" -lt "$jobs" ]; do  # their lines reach the console as they come
    writer "$j" &
    j=$((j + 1))
done
wait

blocks=0 verified=0 bad=0 errors=0
for f in /tmp/rio/[0-9]*; do  # the sums (w*, r*, errors are not blocks)
    [ -e "$f" ] || continue
    b=${f##*/}
    blocks=$((blocks + 1))
    if ! dd if="$disk" of=/tmp/rio/check bs=$bs skip="$b" count=1 iflag=direct 2>/dev/null
    then
        errors=$((errors + 1)); echo "RIO_CHECK $b RERR"
    elif [ "$(sha256sum < /tmp/rio/check | cut -d' ' -f1)" = "$(cat "$f")" ]; then
        verified=$((verified + 1))
    else
        bad=$((bad + 1)); echo "RIO_CHECK $b BAD"
    fi
done
[ -e /tmp/rio/errors ] && errors=$((errors + $(wc -l < /tmp/rio/errors)))
echo "RIO_END blocks=$blocks verified=$verified bad=$bad errors=$errors"
[ "$bad" -eq 0 ] && [ "$errors" -eq 0 ] && [ "$verified" -eq "$blocks" ]
