/* ivshmem-probe: finds the ivshmem PCI device (1af4:1110) on bus 0 through
 * the 0xCF8/0xCFC configuration ports, reads its BAR2 (the shared memory),
 * and either writes a pattern over `bytes` of it (mode=write, then reads it
 * back) or checks a pattern another guest wrote (mode=read). The pattern is
 * derived from seed=N and the word index.
 * Status: 0 ok, 1 no device, 2 bad parameters, 3 the pattern did not match. */
#include "runtime.h"

static u32 pci_read(u32 dev, u32 reg) {
    outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((u16)0xcfc));
    return v;
}

static u64 pattern(u64 seed, u64 i) {
    u64 z = seed * 0x9e3779b97f4a7c15UL + i;
    z = (z ^ (z >> 31)) * 0xbf58476d1ce4e5b9UL;
    return z ^ (z >> 29);
}

int guest_main(void) {
    char mode[16] = "write";
    u64 seed = 1, bytes = 4096;
    header("ivshmem-probe");
    arg_str("mode", mode, sizeof(mode));
    arg_u64("seed", &seed);
    arg_u64("bytes", &bytes);
    if (!bytes || bytes % 8) fail(STATUS_BAD_ARGS, "bytes must be a non-zero multiple of 8");
    u32 dev;
    for (dev = 0; dev < 32; dev++)
        if (pci_read(dev, 0) == 0x11101af4) break;
    if (dev == 32) fail(STATUS_FAIL, "no ivshmem device on PCI bus 0");
    u64 bar2 = (pci_read(dev, 0x18) & ~0xfUL) | ((u64)pci_read(dev, 0x1c) << 32);
    puts("R ivshmem");
    put_kv("slot", dev);
    puts(" bar2=");
    put_hex(bar2);
    putc('\n');
    volatile u64 *mem = (volatile u64 *)bar2;
    u64 words = bytes / 8, bad = 0;
    if (mode[0] == 'w')
        for (u64 i = 0; i < words; i++) mem[i] = pattern(seed, i);
    for (u64 i = 0; i < words; i++)
        if (mem[i] != pattern(seed, i)) bad++;
    puts("R check");
    put_kv("words", words);
    put_kv("mismatches", bad);
    putc('\n');
    puts(bad ? "ivshmem-probe: pattern MISMATCH\n" : "ivshmem-probe: pattern OK\n");
    return bad ? STATUS_CORRUPT : STATUS_OK;
}
