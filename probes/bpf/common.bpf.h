/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * common.bpf.h — pieces every Aperture BPF object has: the event perf
 * buffer, the per-CPU drop counters, the pid/cgroup filter and the helper
 * that writes one event record with its stacks. Included once per object,
 * so each object owns its own copy of these maps.
 */
#ifndef __APERTURE_COMMON_BPF_H__
#define __APERTURE_COMMON_BPF_H__

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "aperture.h"

char LICENSE[] SEC("license") = "GPL";

/* task_struct.flags bit of kernel threads (include/linux/sched.h). */
#define AP_PF_KTHREAD 0x00200000

/* Set by user space before load (EbpfLoader::override_global). */
/* When non-zero, only tasks whose pid is in ap_filter_pids or whose cgroup
 * id is in ap_filter_cgroups are recorded. */
const volatile __u32 ap_filter_enabled = 0;
/* A thread group never recorded (the agent itself); 0 = none. */
const volatile __u32 ap_ignore_tgid = 0;

/* One per-CPU buffer per CPU, filled by user space with its own perf
 * events (max_entries is set to the number of possible CPUs at load). */
struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} ap_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AP_DROP__COUNT);
	__type(key, __u32);
	__type(value, __u64);
} ap_drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u8);
} ap_filter_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u8);
} ap_filter_cgroups SEC(".maps");

/* Thresholds user space can change without reloading (struct ap_settings);
 * zero until the loader writes them, before anything is attached. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ap_settings);
} ap_settings SEC(".maps");

/* The current settings (an array lookup the verifier inlines), or NULL. */
static __always_inline struct ap_settings *ap_settings_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&ap_settings, &zero);
}

/* An event record with room for both stacks; built in a per-CPU scratch
 * slot because it does not fit on the 512-byte BPF stack. */
struct ap_event_buf {
	struct ap_event hdr;
	__u64 stack[2 * AP_MAX_FRAMES];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ap_event_buf);
} ap_scratch SEC(".maps");

static __always_inline void ap_drop(__u32 reason)
{
	__u64 *n = bpf_map_lookup_elem(&ap_drops, &reason);
	if (n)
		*n += 1;
}

/* Whether the current task is to be recorded. */
static __always_inline bool ap_wanted(__u32 tgid)
{
	if (ap_ignore_tgid && tgid == ap_ignore_tgid)
		return false;
	if (!ap_filter_enabled)
		return true;
	if (bpf_map_lookup_elem(&ap_filter_pids, &tgid))
		return true;
	__u64 cg = bpf_get_current_cgroup_id();
	return bpf_map_lookup_elem(&ap_filter_cgroups, &cg) != NULL;
}

static __always_inline bool ap_is_kthread(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	return BPF_CORE_READ(task, flags) & AP_PF_KTHREAD;
}

/* Log2 bucket of a latency: index of the highest set bit, clamped. */
static __always_inline __u32 ap_log2_bucket(__u64 v)
{
	__u32 r = 0, shift;
	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r > AP_HIST_BUCKETS - 1 ? AP_HIST_BUCKETS - 1 : r;
}

#define AP_WANT_KERNEL_STACK 1
#define AP_WANT_USER_STACK 2

/* Fills the per-CPU scratch record's common fields and returns it, or NULL. */
static __always_inline struct ap_event_buf *ap_event_begin(__u16 kind, __u64 id_tgid)
{
	__u32 zero = 0;
	struct ap_event_buf *buf = bpf_map_lookup_elem(&ap_scratch, &zero);
	if (!buf)
		return NULL;
	struct ap_event *e = &buf->hdr;
	e->ts_ns = bpf_ktime_get_boot_ns();
	e->duration_ns = 0;
	e->ret = 0;
	e->addr = 0;
	e->cgroup_id = bpf_get_current_cgroup_id();
	e->pid = id_tgid >> 32;
	e->tid = (__u32)id_tgid;
	e->cpu = bpf_get_smp_processor_id();
	e->arg = 0;
	e->kind = kind;
	e->n_kernel = 0;
	e->n_user = 0;
	e->_pad = 0;
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	return buf;
}

/* Captures the kernel stack into the start of the record; returns the
 * number of frames. */
static __always_inline __u32 ap_event_kernel_stack(void *ctx, struct ap_event_buf *buf)
{
	long r = bpf_get_stack(ctx, buf->stack, AP_MAX_FRAMES * sizeof(__u64), 0);
	if (r < 0) {
		ap_drop(AP_DROP_KERNEL_STACK);
		return 0;
	}
	__u64 n = (__u64)r / sizeof(__u64);
	return n > AP_MAX_FRAMES ? AP_MAX_FRAMES : n;
}

/* Captures the user stack by frame pointers after nk kernel frames;
 * returns the number of frames. */
static __always_inline __u32 ap_event_user_stack_fp(void *ctx, struct ap_event_buf *buf, __u32 nk)
{
	if (nk > AP_MAX_FRAMES)
		nk = AP_MAX_FRAMES;
	long r = bpf_get_stack(ctx, &buf->stack[nk], AP_MAX_FRAMES * sizeof(__u64), BPF_F_USER_STACK);
	if (r < 0) {
		ap_drop(AP_DROP_USER_STACK);
		return 0;
	}
	__u64 n = (__u64)r / sizeof(__u64);
	return n > AP_MAX_FRAMES ? AP_MAX_FRAMES : n;
}

/* Writes the record with nk kernel then nu user frames to the perf buffer
 * of the current CPU. */
static __always_inline void ap_event_output(void *ctx, struct ap_event_buf *buf, __u64 nk, __u64 nu)
{
	if (nk > AP_MAX_FRAMES)
		nk = AP_MAX_FRAMES;
	if (nu > AP_MAX_FRAMES)
		nu = AP_MAX_FRAMES;
	buf->hdr.n_kernel = nk;
	buf->hdr.n_user = nu;
	__u64 size = sizeof(struct ap_event) + (nk + nu) * sizeof(__u64);
	if (size > sizeof(*buf))
		return;
	if (bpf_perf_event_output(ctx, &ap_events, BPF_F_CURRENT_CPU, buf, size) < 0)
		ap_drop(AP_DROP_OUTPUT);
}

/* Captures the wanted stacks into the record (the user stack by frame
 * pointers) and writes it to the perf buffer of the current CPU. */
static __always_inline void ap_event_submit(void *ctx, struct ap_event_buf *buf, __u32 want)
{
	__u32 nk = 0, nu = 0;

	if (want & AP_WANT_KERNEL_STACK)
		nk = ap_event_kernel_stack(ctx, buf);
	if ((want & AP_WANT_USER_STACK) && !ap_is_kthread())
		nu = ap_event_user_stack_fp(ctx, buf, nk);
	ap_event_output(ctx, buf, nk, nu);
}

#include "unwind.bpf.h"

/* Like ap_event_submit, but walks the user stack with the unwind tables:
 * tail-calls the object's step program in the prog array `progs` (a
 * pointer), whose done function
 * must call ap_event_output. Falls back to ap_event_submit's frame-pointer
 * stack when the walk cannot start. */
#define AP_EVENT_SUBMIT_UNWOUND(ctx, perf_ctx, buf, want, progs)                                         \
	do {                                                                                             \
		__u32 __nk = ((want) & AP_WANT_KERNEL_STACK) ? ap_event_kernel_stack((ctx), (buf)) : 0;   \
		__u32 __nu = 0;                                                                          \
		if (((want) & AP_WANT_USER_STACK) && !ap_is_kthread()) {                                 \
			if (ap_unwind_start((ctx), (perf_ctx), (buf)->hdr.pid, __nk))                     \
				bpf_tail_call((ctx), (progs), 0);                                         \
			__nu = ap_event_user_stack_fp((ctx), (buf), __nk);                                \
		}                                                                                        \
		ap_event_output((ctx), (buf), __nk, __nu);                                               \
	} while (0)

#endif /* __APERTURE_COMMON_BPF_H__ */
