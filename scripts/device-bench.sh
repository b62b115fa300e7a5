#!/bin/bash
# The benchmarks run on a lent second machine (see BENCHMARKS.md): the
# release binary carried over as target/release/nfvisor, every result as
# JSON under $OUT. Each step is bounded so one hang cannot eat the budget.
B=${B:-target/release/nfvisor}
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
step() { # name seconds command...
    local name=$1 secs=$2; shift 2
    local t0=$(date +%s.%N)
    timeout "$secs" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
    echo "$name rc=$? $(echo "$(date +%s.%N) - $t0" | bc 2>/dev/null || true)s" | tee -a "$OUT/steps.txt"
}
{
    uname -a; nproc; free -g | head -2
    grep -m1 'model name' /proc/cpuinfo
    echo "vmx/svm flags: $(grep -c -w -E 'vmx|svm' /proc/cpuinfo)"
    ls -la /dev/kvm; lsmod 2>/dev/null | grep -i kvm
    cat /sys/module/kvm_intel/parameters/nested 2>/dev/null
    cat /etc/os-release | head -2
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step host-check 30 $B host check --json
[ -e /dev/kvm ] || exit 0
step hello 30 $B run --guest hello --json
step exits-seccomp-on 60 $B bench exits --no-qemu --rounds 3 --json
step exits-seccomp-off 60 $B --seccomp off bench exits --no-qemu --rounds 3 --json
step latency 90 $B bench latency --samples 2000 --compare-profiles --cpus 4 --housekeeping-cpus 0 --rt-priority 80 --rt-best-effort --json
step migration 120 $B bench migration --scenario all --no-qemu --runs 3 --prefault-memory 8G --json
step startup 40 $B bench startup --runs 20 --json
step ivshmem 30 $B bench ivshmem --json
step zero-scan 30 $B bench zero-scan --mib 2048 --rounds 5 --json
