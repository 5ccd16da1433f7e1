#!/bin/busybox sh
# Runs scenario NAME (/lib/pviommu/scenarios/NAME.sh) in a lab's guest, from its
# shell: the same scenarios the demo's own init ran, with the same markers, its
# env from /etc/pviommu.env. A failure marks FAIL and ends the scenario (not the
# guest); every run ends with a DONE marker.
. /lib/pviommu/scenario.sh
fail() { mark FAIL "reason=$*"; mark DONE rc=1; exit 1; }
[ -f /etc/pviommu.env ] && . /etc/pviommu.env
mark BOOTED uptime="$(cut -d' ' -f1 /proc/uptime)"
. "/lib/pviommu/scenarios/$1.sh"
rc=$?
mark DONE rc=$rc
