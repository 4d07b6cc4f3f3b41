// Number, duration, percentage and time formatting, and what each profiling
// mode's values mean. Locale-independent so screenshots and tests are stable.

const grouped = new Intl.NumberFormat('en-US');

/** 1234567 -> "1,234,567". */
export function count(n) {
  return grouped.format(Math.round(n));
}

/** Nanoseconds -> "850 ns", "12.3 µs", "4.56 ms", "1.23 s", "2 min 3 s", "1.5 h". */
export function duration(ns) {
  if (!Number.isFinite(ns)) return '–';
  const a = Math.abs(ns);
  const sign = ns < 0 ? '-' : '';
  if (a < 1e3) return `${sign}${Math.round(a)} ns`;
  if (a < 1e6) return `${sign}${sig(a / 1e3)} µs`;
  if (a < 1e9) return `${sign}${sig(a / 1e6)} ms`;
  if (a < 60e9) return `${sign}${sig(a / 1e9)} s`;
  if (a < 3600e9) {
    const m = Math.floor(a / 60e9);
    const s = Math.round((a - m * 60e9) / 1e9);
    return `${sign}${m} min ${s} s`;
  }
  return `${sign}${sig(a / 3600e9)} h`;
}

/** Three significant digits, at most two decimals. */
function sig(x) {
  if (x >= 100) return x.toFixed(0);
  if (x >= 10) return x.toFixed(1);
  return x.toFixed(2);
}

/** A ratio (0..1) -> "75.0%"; small shares keep two significant digits. */
export function pct(ratio) {
  if (!Number.isFinite(ratio)) return '–';
  const p = ratio * 100;
  if (p === 0) return '0%';
  if (p >= 99.95 && p <= 100) return '100%';
  if (Math.abs(p) < 0.1) return `${p.toPrecision(2)}%`;
  return `${p.toFixed(1)}%`;
}

/** A signed change of share in percentage points -> "+12.3 pp". */
export function points(delta) {
  const p = delta * 100;
  const s = Math.abs(p) < 0.05 ? '±0.0' : `${p > 0 ? '+' : '−'}${Math.abs(p).toFixed(1)}`;
  return `${s} pp`;
}

/** What a mode's values are and how to show them. */
export const MODES = {
  cpu: {
    key: 'cpu',
    label: 'CPU',
    title: 'CPU profile',
    what: 'CPU samples',
    measure: 'CPU time',
    countName: 'samples',
    empty: 'No CPU samples',
    value: (v) => `${count(v)} ${v === 1 ? 'sample' : 'samples'}`,
    short: (v) => count(v),
    time: (ns) => `${duration(ns)} CPU`,
  },
  lock: {
    key: 'lock',
    label: 'Lock',
    title: 'Lock contention',
    what: 'lock waits',
    measure: 'wait time',
    countName: 'waits',
    empty: 'No lock waits',
    value: (v) => `${duration(v)} waited`,
    short: (v) => duration(v),
    time: (ns) => `${duration(ns)} waited`,
  },
  syscall: {
    key: 'syscall',
    label: 'Syscall',
    title: 'Slow system calls',
    what: 'slow system calls',
    measure: 'syscall time',
    countName: 'calls',
    empty: 'No slow system calls',
    value: (v) => `${duration(v)} in syscalls`,
    short: (v) => duration(v),
    time: (ns) => `${duration(ns)} in syscalls`,
  },
};

/** Bytes in binary units: "4.0 KiB". */
export function bytes(v) {
  const units = ['bytes', 'KiB', 'MiB', 'GiB', 'TiB'];
  let x = v;
  let i = 0;
  while (Math.abs(x) >= 1024 && i < units.length - 1) {
    x /= 1024;
    i++;
  }
  return i ? `${x.toFixed(1)} ${units[i]}` : `${count(v)} bytes`;
}

/**
 * How to show the values of a pushed profile type, from its id
 * `name:sample_type:sample_unit:period_type:period_unit`: in its unit
 * (bytes, nanoseconds, or a count of its sample type).
 */
export function typeMode(id) {
  const [name = '', sampleType = '', unit = ''] = id.split(':');
  let value;
  if (unit === 'bytes') value = bytes;
  else if (unit === 'nanoseconds') value = (v) => duration(v);
  else value = (v) => `${count(v)} ${unit === 'count' || !unit ? sampleType : unit}`;
  return {
    key: id,
    pushed: true,
    unit,
    label: name,
    title: `${name} profile (${sampleType})`,
    what: `${sampleType} (${name})`,
    measure: sampleType,
    countName: 'samples',
    empty: `No ${sampleType} data`,
    value,
    short: value,
    time: value,
  };
}

/** The display rules of an agent mode (`cpu`, `lock`, `syscall`) or a pushed type id. */
export function modeOf(key) {
  return MODES[key] || typeMode(key);
}

const pad = (n) => String(n).padStart(2, '0');

/** Unix seconds -> local "2024-05-01 12:03". */
export function dateTime(s) {
  const d = new Date(s * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** Unix seconds -> local "12:03" when today, else the date too. */
export function clock(s) {
  const d = new Date(s * 1000);
  const today = new Date();
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return d.toDateString() === today.toDateString() ? hm : dateTime(s);
}

/** A resolved range -> "12:00 – 12:15". */
export function span(from, to) {
  return `${clock(from)} – ${clock(to)}`;
}

/** Unix seconds -> the value of an <input type="datetime-local">. */
export function toLocalInput(s) {
  const d = new Date(s * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** The value of an <input type="datetime-local"> -> unix seconds (NaN when empty). */
export function fromLocalInput(v) {
  return v ? Math.floor(new Date(v).getTime() / 1000) : NaN;
}
