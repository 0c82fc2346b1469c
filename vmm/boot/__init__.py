"""x86-64 Linux boot: kernel image loading, boot_params, initial CPU state."""
