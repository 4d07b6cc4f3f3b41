/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * lock.bpf.c — time threads spend waiting for locks.
 *
 * Kernel locks: lock:contention_begin / contention_end (5.19+), timed per
 * thread, aggregated per (pid, kernel stack, lock flags).
 * User locks: every user-space lock that blocks ends in a futex wait, so
 * syscalls:sys_enter_futex / sys_exit_futex with a wait operation are timed
 * per thread and aggregated per (pid, user stack).
 *
 * Aggregates go to the active one of two slots (ap_slot) so user space can
 * drain one while the programs fill the other; waits of at least the
 * lock threshold (ap_settings, changed live by user space) are also written
 * individually.
 */
#include "common.bpf.h"

/* futex(2) operations (include/uapi/linux/futex.h). */
#define AP_FUTEX_CMD_MASK 127
#define AP_FUTEX_WAIT 0
#define AP_FUTEX_LOCK_PI 6
#define AP_FUTEX_WAIT_BITSET 9
#define AP_FUTEX_WAIT_REQUEUE_PI 11
#define AP_FUTEX_LOCK_PI2 13

struct ap_wait_start {
	__u64 ts_ns;
	__u64 addr;
	__u32 arg; /* LCB_F_* flags or futex op */
	__u32 active;
};

/* Per-thread start of the current kernel-lock wait, and of the current
 * futex wait (a futex wait can contend kernel locks, so they are apart). */
struct ap_wait_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct ap_wait_start);
};
struct ap_wait_map ap_klock_start SEC(".maps");
struct ap_wait_map ap_futex_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ap_slot);
} ap_slot SEC(".maps");

struct ap_lock_agg_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, struct ap_lock_key);
	__type(value, struct ap_lock_value);
};
struct ap_lock_agg_map ap_lock_agg_0 SEC(".maps");
struct ap_lock_agg_map ap_lock_agg_1 SEC(".maps");

/* Stacks referenced by the aggregates of the same slot. */
struct ap_stack_map {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 4096);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, AP_MAX_FRAMES * sizeof(__u64));
};
struct ap_stack_map ap_stacks_0 SEC(".maps");
struct ap_stack_map ap_stacks_1 SEC(".maps");

/* User stacks of futex waits walked with the unwind tables, by their hash
 * (ap_lock_key.ustack): AP_MAX_FRAMES addresses, leaf first, ended by a 0
 * when shorter. */
struct ap_ustack_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 4096);
	__uint(key_size, sizeof(__u64));
	__uint(value_size, AP_MAX_FRAMES * sizeof(__u64));
};
struct ap_ustack_map ap_ustacks_0 SEC(".maps");
struct ap_ustack_map ap_ustacks_1 SEC(".maps");

AP_UNWIND_PROGS(ap_lock_unwind_progs);

static __always_inline void ap_wait_begin(void *starts, __u64 addr, __u32 arg)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;

	if (!ap_wanted(id >> 32))
		return;
	struct ap_wait_start *s = bpf_map_lookup_elem(starts, &tid);
	if (s) {
		/* A mutex that spins then sleeps reports a second begin for the
		 * same lock: keep the first start. */
		if (s->active && s->addr == addr) {
			s->arg = arg;
			return;
		}
		s->ts_ns = bpf_ktime_get_ns();
		s->addr = addr;
		s->arg = arg;
		s->active = 1;
		return;
	}
	struct ap_wait_start fresh = { .ts_ns = bpf_ktime_get_ns(), .addr = addr, .arg = arg, .active = 1 };
	if (bpf_map_update_elem(starts, &tid, &fresh, BPF_ANY) < 0)
		ap_drop(AP_DROP_MAP_FULL);
}

static __always_inline void ap_lock_add(void *agg, struct ap_lock_key *key, __u64 dur)
{
	struct ap_lock_value *v = bpf_map_lookup_elem(agg, key);
	if (!v) {
		struct ap_lock_value fresh = { .count = 1, .total_ns = dur, .max_ns = dur };
		bpf_get_current_comm(fresh.comm, sizeof(fresh.comm));
		if (bpf_map_update_elem(agg, key, &fresh, BPF_NOEXIST) == 0)
			return;
		v = bpf_map_lookup_elem(agg, key);
		if (!v) {
			ap_drop(AP_DROP_MAP_FULL);
			return;
		}
	}
	__sync_fetch_and_add(&v->count, 1);
	__sync_fetch_and_add(&v->total_ns, dur);
	if (dur > v->max_ns)
		v->max_ns = dur;
}

static __always_inline void ap_lock_account(void *agg, void *stacks, void *ctx, struct ap_lock_key *key,
					    __u64 stack_flags, __u64 dur)
{
	long sid = bpf_get_stackid(ctx, stacks, stack_flags);
	if (sid < 0) {
		/* -EEXIST: hash collision with another stack; else no stack. */
		ap_drop(sid == -17 ? AP_DROP_STACK_COLLISION :
			(stack_flags & BPF_F_USER_STACK) ? AP_DROP_USER_STACK : AP_DROP_KERNEL_STACK);
	}
	key->stack_id = sid < 0 ? -1 : (__s32)sid;
	ap_lock_add(agg, key, dur);
}

/* End of a futex wait's stack walk: the stack goes to the active slot's
 * ap_ustacks, the wait to its aggregate under the stack's hash, and the
 * record out when the wait was above the threshold (st->arg1). */
static __always_inline void ap_lock_done(void *ctx, struct ap_unwind_state *st, struct ap_event_buf *buf)
{
	struct ap_lock_key key = { .pid = st->pid, .stack_id = -1, .flags = 0, .futex = 1, .ustack = st->hash };
	__u32 n = st->n;
	if (n < AP_MAX_FRAMES)
		buf->stack[n] = 0;
	__u32 zero = 0;
	struct ap_slot *slot = bpf_map_lookup_elem(&ap_slot, &zero);
	if (slot && slot->active) {
		bpf_map_update_elem(&ap_ustacks_1, &key.ustack, buf->stack, BPF_NOEXIST);
		ap_lock_add(&ap_lock_agg_1, &key, st->arg0);
	} else {
		bpf_map_update_elem(&ap_ustacks_0, &key.ustack, buf->stack, BPF_NOEXIST);
		ap_lock_add(&ap_lock_agg_0, &key, st->arg0);
	}
	if (st->arg1)
		ap_event_output(ctx, buf, 0, n);
}

AP_UNWIND_STEP(ap_lockunw, "tracepoint/syscalls/sys_exit_futex", ap_lock_unwind_progs, ap_lock_done)

static __always_inline void ap_wait_end(void *ctx, void *starts, __u64 addr, bool futex, long ret)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;

	struct ap_wait_start *s = bpf_map_lookup_elem(starts, &tid);
	if (!s)
		return; /* not wanted at begin */
	/* The kernel reports contention_end more than once for some waits (a
	 * mutex that stops spinning, then sleeps): only the first one counts. */
	if (!s->active)
		return;
	if (!futex && s->addr != addr) {
		ap_drop(AP_DROP_NO_START);
		return;
	}
	s->active = 0;
	__u64 dur = bpf_ktime_get_ns() - s->ts_ns;
	struct ap_settings *cfg = ap_settings_get();
	__u64 threshold = cfg ? cfg->lock_threshold_ns : 0;
	if (futex && ap_unwind_enabled) {
		/* Walk the user stack with the unwind tables; the step program
		 * accounts the wait. Falls through to frame pointers when the
		 * walk cannot start. */
		struct ap_event_buf *buf = ap_event_begin(AP_EVENT_LOCK_FUTEX, id);
		if (buf && ap_unwind_start(ctx, false, id >> 32, 0)) {
			struct ap_unwind_state *st = ap_unwind_state_get();
			if (st) {
				buf->hdr.duration_ns = dur;
				buf->hdr.ret = ret;
				buf->hdr.addr = s->addr;
				buf->hdr.arg = s->arg;
				st->arg0 = dur;
				st->arg1 = threshold && dur >= threshold;
				bpf_tail_call(ctx, &ap_lock_unwind_progs, 0);
			}
		}
	}
	struct ap_lock_key key = {
		.pid = id >> 32,
		.flags = futex ? 0 : s->arg,
		.futex = futex,
		.ustack = 0,
	};
	__u64 stack_flags = futex ? BPF_F_USER_STACK : 0;

	__u32 zero = 0;
	struct ap_slot *slot = bpf_map_lookup_elem(&ap_slot, &zero);
	if (slot && slot->active)
		ap_lock_account(&ap_lock_agg_1, &ap_stacks_1, ctx, &key, stack_flags, dur);
	else
		ap_lock_account(&ap_lock_agg_0, &ap_stacks_0, ctx, &key, stack_flags, dur);

	if (threshold && dur >= threshold) {
		struct ap_event_buf *buf = ap_event_begin(futex ? AP_EVENT_LOCK_FUTEX : AP_EVENT_LOCK_KERNEL, id);
		if (!buf)
			return;
		buf->hdr.duration_ns = dur;
		buf->hdr.ret = ret;
		buf->hdr.addr = s->addr;
		buf->hdr.arg = s->arg;
		ap_event_submit(ctx, buf, futex ? AP_WANT_USER_STACK : AP_WANT_KERNEL_STACK);
	}
}

SEC("tp_btf/contention_begin")
int BPF_PROG(ap_lockbeg_btf, void *lock, unsigned int flags)
{
	ap_wait_begin(&ap_klock_start, (__u64)lock, flags);
	return 0;
}

SEC("tp_btf/contention_end")
int BPF_PROG(ap_lockend_btf, void *lock, int ret)
{
	ap_wait_end(ctx, &ap_klock_start, (__u64)lock, false, ret);
	return 0;
}

SEC("raw_tracepoint/contention_begin")
int BPF_PROG(ap_lockbeg_raw, void *lock, unsigned int flags)
{
	ap_wait_begin(&ap_klock_start, (__u64)lock, flags);
	return 0;
}

SEC("raw_tracepoint/contention_end")
int BPF_PROG(ap_lockend_raw, void *lock, int ret)
{
	ap_wait_end(ctx, &ap_klock_start, (__u64)lock, false, ret);
	return 0;
}

/* Layout of the syscalls:sys_{enter,exit}_futex tracepoint records (fixed by
 * the syscall tracepoint ABI: 8-byte common header, nr, 8-byte arguments). */
struct ap_futex_enter_ctx {
	__u64 common;
	__s32 nr;
	__u32 _pad;
	__u64 uaddr;
	__u64 op;
	__u64 val;
	__u64 utime;
	__u64 uaddr2;
	__u64 val3;
};

struct ap_futex_exit_ctx {
	__u64 common;
	__s32 nr;
	__u32 _pad;
	__s64 ret;
};

SEC("tracepoint/syscalls/sys_enter_futex")
int ap_futex_enter(struct ap_futex_enter_ctx *ctx)
{
	__u32 cmd = ctx->op & AP_FUTEX_CMD_MASK;

	if (cmd != AP_FUTEX_WAIT && cmd != AP_FUTEX_WAIT_BITSET && cmd != AP_FUTEX_LOCK_PI &&
	    cmd != AP_FUTEX_LOCK_PI2 && cmd != AP_FUTEX_WAIT_REQUEUE_PI)
		return 0;
	ap_wait_begin(&ap_futex_start, ctx->uaddr, (__u32)ctx->op);
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_futex")
int ap_futex_exit(struct ap_futex_exit_ctx *ctx)
{
	ap_wait_end(ctx, &ap_futex_start, 0, true, ctx->ret);
	return 0;
}
