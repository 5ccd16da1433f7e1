# Helpers of the guest scenarios. Lines starting with "@@PVIOMMU " are markers
# the host parses: "@@PVIOMMU NAME key=value ...".
mark() { echo "@@PVIOMMU $*"; }

# wait_for PATH SECONDS: polls for a file to appear.
wait_for() {
    n=0
    while [ ! -e "$1" ]; do
        n=$((n + 1))
        [ "$n" -gt $(($2 * 10)) ] && return 1
        sleep 0.1
    done
}
