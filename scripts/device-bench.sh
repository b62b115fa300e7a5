#!/bin/bash
# The benchmarks run on a lent second machine (see BENCHMARKS.md): the
# release binary carried over (B), every result under one tarball in $OUT
# (the device tool brings back only a few files). Each step is bounded so
# one hang cannot eat the budget.
B=${B:-target/release/nfvisor}
OUT=${OUT:-/tmp/device-out}
W=$(mktemp -d)
step() { # name seconds command...
    local name=$1 secs=$2; shift 2
    local t0=$(date +%s%N)
    timeout "$secs" "$@" >"$W/$name.json" 2>"$W/$name.err"
    local rc=$?
    echo "$name rc=$rc $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$W/steps.txt"
}
{
    uname -a; nproc; free -g | head -2
    grep -m1 'model name' /proc/cpuinfo
    echo "vmx/svm flags: $(grep -c -w -E 'vmx|svm' /proc/cpuinfo)"
    ls -la /dev/kvm; cat /etc/os-release | head -2
} >"$W/machine.txt" 2>&1
cat "$W/machine.txt"
step host-check 30 $B host check --json
if [ -e /dev/kvm ]; then
    # the seccomp filters' cost per exit: on and off interleaved, twice
    for i in 1 2; do
        step exits-on-$i 50 $B bench exits --no-qemu --rounds 3 --json
        step exits-off-$i 50 $B --seccomp off bench exits --no-qemu --rounds 3 --json
    done
    for s in on off; do
        step latency-$s 60 $B --seccomp $s bench latency --metric timer --samples 2000 --cpus 4 --housekeeping-cpus 0 --rt-priority 80 --rt-best-effort --json
    done
    step migration 120 $B bench migration --scenario all --no-qemu --runs 3 --prefault-memory 8G --json
    step startup 40 $B bench startup --runs 20 --json
fi
tar -C "$W" -czf "$OUT/results.tar.gz" .
cat "$W/steps.txt"
