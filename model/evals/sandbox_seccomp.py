"""The seccomp filter the HumanEval sandbox loads through `bwrap --seccomp` (see model/evals/sandbox.py).

Why a filter on top of the namespaces: RLIMIT_NPROC does not bind a process whose host uid is 0 (the
kernel exempts root's user outright, user namespace or not), so when the evaluator runs as root, as it
does in most containers, a fork bomb would be bounded only by the wall clock. The filter makes process
creation fail with EPERM in the kernel, where the audit hook could only refuse it in Python
(`_posixsubprocess.fork_exec` walks around the hook). Threads stay allowed: `clone` is let through only
with CLONE_THREAD, and `clone3` (whose flags sit in memory a classic BPF filter cannot read) answers
ENOSYS so glibc falls back to `clone`, the way container runtimes handle it.

The rest of the list takes away kernel interfaces no HumanEval program needs and that are the usual
first step of a kernel exploit or a container escape: ptrace and cross-process memory access, keyrings,
eBPF, perf, userfaultfd, io_uring, every mount and namespace call, module and kexec loading, file
handles (`open_by_handle_at`), personality changes. Any other architecture's system call ABI (i386 via
`int 0x80`, x32) kills the process, since the numbers below would mean something else there.

The filter is classic BPF built here by hand (eight bytes per instruction), so no libseccomp is needed.
On architectures without a table below, `program()` returns None and the sandbox runs without it;
`isolation()` reports which.
"""
from __future__ import annotations

import errno
import platform
import struct

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_NR, _ARCH, _ARG0_LOW = 0, 4, 16  # args[0]'s low 32 bits (both supported architectures are little-endian)
_LD_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_ERRNO = 0x00050000
CLONE_THREAD = 0x00010000
_X32_BIT = 0x40000000

# Denied with EPERM: process creation, then the kernel surface named in the module doc.
_DENIED = ("fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev", "keyctl", "add_key", "request_key",
           "bpf", "perf_event_open", "userfaultfd", "mount", "umount2", "pivot_root", "unshare", "setns",
           "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "io_uring_setup",
           "io_uring_enter", "io_uring_register", "open_by_handle_at", "name_to_handle_at", "chroot", "acct",
           "swapon", "swapoff", "reboot", "syslog", "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount",
           "fspick", "mount_setattr", "personality", "quotactl")

# System call numbers (Linux uapi: asm/unistd_64.h for x86_64, asm-generic/unistd.h for aarch64, which has
# no fork or vfork of its own).
_TABLES = {
    "x86_64": (0xC000003E, {
        "clone": 56, "clone3": 435, "fork": 57, "vfork": 58, "ptrace": 101, "process_vm_readv": 310,
        "process_vm_writev": 311, "keyctl": 250, "add_key": 248, "request_key": 249, "bpf": 321,
        "perf_event_open": 298, "userfaultfd": 323, "mount": 165, "umount2": 166, "pivot_root": 155, "unshare": 272,
        "setns": 308, "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
        "delete_module": 176, "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
        "open_by_handle_at": 304, "name_to_handle_at": 303, "chroot": 161, "acct": 163, "swapon": 167,
        "swapoff": 168, "reboot": 169, "syslog": 103, "open_tree": 428, "move_mount": 429, "fsopen": 430,
        "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "personality": 135, "quotactl": 179}),
    "aarch64": (0xC00000B7, {
        "clone": 220, "clone3": 435, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
        "keyctl": 219, "add_key": 217, "request_key": 218, "bpf": 280, "perf_event_open": 241, "userfaultfd": 282,
        "mount": 40, "umount2": 39, "pivot_root": 41, "unshare": 97, "setns": 268, "kexec_load": 104,
        "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
        "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "open_by_handle_at": 265,
        "name_to_handle_at": 264, "chroot": 51, "acct": 89, "swapon": 224, "swapoff": 225, "reboot": 142,
        "syslog": 116, "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
        "fspick": 433, "mount_setattr": 442, "personality": 92, "quotactl": 60}),
}
_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)  # struct sock_filter, in the kernel's byte order


def machine() -> str:
    m = platform.machine().lower()
    return _ALIASES.get(m, m)


def program(arch: str | None = None) -> bytes | None:
    """The filter for `arch` (default: this machine) as `bwrap --seccomp` reads it, or None when unsupported."""
    table = _TABLES.get(arch or machine())
    if table is None:
        return None
    audit_arch, nr = table
    eperm = _ERRNO | errno.EPERM
    out = [_insn(_LD_ABS, _ARCH), _insn(_JEQ, audit_arch, 1, 0), _insn(_RET, _KILL_PROCESS), _insn(_LD_ABS, _NR)]
    if audit_arch == _TABLES["x86_64"][0]:  # x32 calls share the arch value; they set this bit in the number
        out += [_insn(_JGE, _X32_BIT, 0, 1), _insn(_RET, _KILL_PROCESS)]
    # clone: a thread (CLONE_THREAD set) passes, a new process gets EPERM. The branch ends in a return,
    # so loading args[0] into the accumulator cannot confuse the checks after it.
    out += [_insn(_JEQ, nr["clone"], 0, 4), _insn(_LD_ABS, _ARG0_LOW), _insn(_JSET, CLONE_THREAD, 1, 0),
            _insn(_RET, eperm), _insn(_RET, _ALLOW)]
    out += [_insn(_JEQ, nr["clone3"], 0, 1), _insn(_RET, _ERRNO | errno.ENOSYS)]
    for name in _DENIED:
        if name in nr:
            out += [_insn(_JEQ, nr[name], 0, 1), _insn(_RET, eperm)]
    out.append(_insn(_RET, _ALLOW))
    return b"".join(out)
