/* PVH entry, long-mode switch, AP trampoline and interrupt stubs shared by
 * every bundled guest. Hand-written: there is no bare-metal Rust target on
 * the build machines, and a guest must run unchanged under QEMU. */

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define AP_TRAMP_BASE 0x8000
#define STACK_SIZE 16384
#define MAX_CPUS 16

    .section .note.Xen, "a"
    .p2align 2
    .long 4                         /* name size: "Xen\0" */
    .long 4                         /* descriptor size */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .p2align 2
    .long pvh_start32

/* Shared by the BSP and the APs (a macro: PVH gives no stack to call with):
 * GDT, identity page tables, EFER.LME, paging. */
    .macro ENTER_LONG_MODE32
    lgdt gdt_desc
    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                 /* CR4.PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax           /* PG | PE */
    movl %eax, %cr0
    .endm

    .macro LOAD_DATA_SEGMENTS
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    .endm

/* ---------------------------------------------------------------- BSP --- */
    .section .text.boot32, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    movl %ebx, start_info_ptr
    ENTER_LONG_MODE32
    ljmp $0x08, $bsp_long

    .code64
bsp_long:
    LOAD_DATA_SEGMENTS
    leaq bsp_stack_top(%rip), %rsp
    movl start_info_ptr(%rip), %edi
    call guest_main
    movl %eax, %edi
    call guest_exit
1:  hlt
    jmp 1b

/* ------------------------------------------------------- AP entry ------- */
    .code32
    .globl ap_start32
ap_start32:
    ENTER_LONG_MODE32
    ljmp $0x08, $ap_long

    .code64
ap_long:
    LOAD_DATA_SEGMENTS
    /* stack indexed by the initial APIC ID (CPUID.1:EBX[31:24]) */
    movl $1, %eax
    cpuid
    shrl $24, %ebx
    andl $(MAX_CPUS - 1), %ebx
    movl %ebx, %edi
    incl %ebx
    imull $STACK_SIZE, %ebx
    leaq ap_stacks(%rip), %rsp
    addq %rbx, %rsp
    call ap_main
2:  cli
    hlt
    jmp 2b

/* Real-mode trampoline, copied to AP_TRAMP_BASE by the BSP; SIPI vector 8. */
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (tramp_gdt_desc - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(AP_TRAMP_BASE + tramp_pm32 - ap_tramp_start)
    .code32
tramp_pm32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $ap_start32, %eax
    jmp *%eax
    .p2align 2
tramp_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:

/* --------------------------------------------------- interrupt stubs --- */
    .code64
    .macro SAVE_CALL fn
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    call \fn
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    .endm

    .globl timer_stub
timer_stub:
    SAVE_CALL timer_irq
    iretq

    .globl ext_stub
ext_stub:
    SAVE_CALL ext_irq
    iretq

    .globl spurious_stub
spurious_stub:
    iretq

/* Exceptions: report the vector and end the guest (status 4). */
    .globl exception_stubs
    .p2align 4
exception_stubs:
    .set vec, 0
    .rept 32
    .p2align 4
    movl $vec, %edi
    movq (%rsp), %rsi               /* error code or RIP, reported raw */
    jmp exception_common
    .set vec, vec + 1
    .endr
exception_common:
    andq $-16, %rsp
    call exception_handler
3:  cli
    hlt
    jmp 3b

/* ------------------------------------------------------------- data --- */
    .section .data
    .p2align 3
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF        /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF        /* 0x10: data */
    .quad 0x00CF9A000000FFFF        /* 0x18: 32-bit code */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl start_info_ptr
start_info_ptr:
    .long 0

/* Identity map of the low 4 GiB with 2 MiB pages (1 GiB pages are not
 * offered on every host); the top GiB (MMIO, LAPIC) uncached. Static, so no
 * guest instructions are spent building it. */
    .p2align 12
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3
    .quad pd + 0x1000 + 0x3
    .quad pd + 0x2000 + 0x3
    .quad pd + 0x3000 + 0x3
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 2048
    .if addr >= 0xC0000000
    .quad addr + 0x9B               /* P | RW | PWT | PCD | PS */
    .else
    .quad addr + 0x83               /* P | RW | PS */
    .endif
    .set addr, addr + 0x200000
    .endr

    .section .bss
    .p2align 12
    .space STACK_SIZE
bsp_stack_top:
ap_stacks:
    .space STACK_SIZE * MAX_CPUS
    .section .note.GNU-stack, "", @progbits
