/* SPDX-License-Identifier: GPL-2.0 OR Apache-2.0 */
/*
 * syscall.bpf.c — latency of every system call, aggregated in the kernel.
 *
 * sys_enter stores (start time, number) per thread; sys_exit adds the call
 * to the per-CPU aggregate of (pid, number) in the active slot: count,
 * errors, total time and a log2 histogram. Calls slower than the slow-call
 * threshold (ap_settings, changed live by user space) are also written
 * individually with the user stack.
 *
 * Three attach flavours of the same logic, the loader picks the first the
 * kernel accepts: BTF raw tracepoints (cheapest), raw tracepoints, classic
 * raw_syscalls tracepoints. Each has its own unwind step program (a tail
 * call needs a program of the caller's type).
 */
#include "common.bpf.h"

AP_UNWIND_PROGS(ap_sys_unwind_btf);
AP_UNWIND_PROGS(ap_sys_unwind_raw);
AP_UNWIND_PROGS(ap_sys_unwind_tp);

static __always_inline void ap_sys_done(void *ctx, struct ap_unwind_state *st, struct ap_event_buf *buf)
{
	ap_event_output(ctx, buf, st->nk, st->n);
}

AP_UNWIND_STEP(ap_sysunw_btf, "tp_btf/sys_exit", ap_sys_unwind_btf, ap_sys_done)
AP_UNWIND_STEP(ap_sysunw_raw, "raw_tracepoint/sys_exit", ap_sys_unwind_raw, ap_sys_done)
AP_UNWIND_STEP(ap_sysunw_tp, "tracepoint/raw_syscalls/sys_exit", ap_sys_unwind_tp, ap_sys_done)

struct ap_sys_start {
	__u64 ts_ns;
	__u64 nr; /* syscall number + 1; 0 once consumed */
};

/* Per-thread start of the current call. LRU so that threads that die
 * inside a call never leak an entry. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct ap_sys_start);
} ap_sys_start SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ap_slot);
} ap_slot SEC(".maps");

/* Two aggregate slots: the programs write the one ap_slot names while user
 * space drains and clears the other. */
struct ap_sys_stats_map {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct ap_syscall_key);
	__type(value, struct ap_syscall_value);
};
struct ap_sys_stats_map ap_sys_stats_0 SEC(".maps");
struct ap_sys_stats_map ap_sys_stats_1 SEC(".maps");

static __always_inline void ap_sys_enter(long nr)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;

	if (nr < 0 || !ap_wanted(id >> 32))
		return;
	__u64 now = bpf_ktime_get_ns();
	struct ap_sys_start *s = bpf_map_lookup_elem(&ap_sys_start, &tid);
	if (s) {
		s->ts_ns = now;
		s->nr = nr + 1;
		return;
	}
	struct ap_sys_start fresh = { .ts_ns = now, .nr = nr + 1 };
	if (bpf_map_update_elem(&ap_sys_start, &tid, &fresh, BPF_ANY) < 0)
		ap_drop(AP_DROP_MAP_FULL);
}

static __always_inline void ap_sys_account(void *stats, struct ap_syscall_key *key, __u64 dur, long ret)
{
	struct ap_syscall_value *v = bpf_map_lookup_elem(stats, key);
	if (!v) {
		struct ap_syscall_value zero = {};
		bpf_get_current_comm(zero.comm, sizeof(zero.comm));
		if (bpf_map_update_elem(stats, key, &zero, BPF_NOEXIST) < 0 && !bpf_map_lookup_elem(stats, key)) {
			ap_drop(AP_DROP_MAP_FULL);
			return;
		}
		v = bpf_map_lookup_elem(stats, key);
		if (!v)
			return;
	}
	v->count += 1;
	v->total_ns += dur;
	if ((unsigned long)ret >= (unsigned long)-4095)
		v->errors += 1;
	__u32 b = ap_log2_bucket(dur);
	if (b < AP_HIST_BUCKETS)
		v->hist[b] += 1;
}

static __always_inline void ap_sys_exit(void *ctx, long ret, void *progs)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)id;

	struct ap_sys_start *s = bpf_map_lookup_elem(&ap_sys_start, &tid);
	if (!s)
		return; /* not wanted at enter (filtered) or attached mid-call */
	if (s->nr == 0) {
		ap_drop(AP_DROP_NO_START);
		return;
	}
	__u64 dur = bpf_ktime_get_ns() - s->ts_ns;
	struct ap_syscall_key key = { .pid = id >> 32, .nr = s->nr - 1 };
	s->nr = 0;

	__u32 zero = 0;
	struct ap_slot *slot = bpf_map_lookup_elem(&ap_slot, &zero);
	if (slot && slot->active)
		ap_sys_account(&ap_sys_stats_1, &key, dur, ret);
	else
		ap_sys_account(&ap_sys_stats_0, &key, dur, ret);

	struct ap_settings *cfg = ap_settings_get();
	__u64 threshold = cfg ? cfg->slow_threshold_ns : 0;
	if (threshold && dur >= threshold) {
		struct ap_event_buf *buf = ap_event_begin(AP_EVENT_SLOW_SYSCALL, id);
		if (!buf)
			return;
		buf->hdr.duration_ns = dur;
		buf->hdr.ret = ret;
		buf->hdr.arg = key.nr;
		AP_EVENT_SUBMIT_UNWOUND(ctx, false, buf, AP_WANT_USER_STACK, progs);
	}
}

SEC("tp_btf/sys_enter")
int BPF_PROG(ap_sysent_btf, struct pt_regs *regs, long id)
{
	ap_sys_enter(id);
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(ap_sysexit_btf, struct pt_regs *regs, long ret)
{
	ap_sys_exit(ctx, ret, &ap_sys_unwind_btf);
	return 0;
}

SEC("raw_tracepoint/sys_enter")
int BPF_PROG(ap_sysent_raw, struct pt_regs *regs, long id)
{
	ap_sys_enter(id);
	return 0;
}

SEC("raw_tracepoint/sys_exit")
int BPF_PROG(ap_sysexit_raw, struct pt_regs *regs, long ret)
{
	ap_sys_exit(ctx, ret, &ap_sys_unwind_raw);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int ap_sysent_tp(struct trace_event_raw_sys_enter *ctx)
{
	ap_sys_enter(ctx->id);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_exit")
int ap_sysexit_tp(struct trace_event_raw_sys_exit *ctx)
{
	ap_sys_exit(ctx, ctx->ret, &ap_sys_unwind_tp);
	return 0;
}
