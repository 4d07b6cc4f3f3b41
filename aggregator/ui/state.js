// The whole view state, and its round trip through the URL's query string,
// so that a view can be shared and a reload restores it.

export const PRESETS = [
  { key: '5m', secs: 300, label: '5m', phrase: 'in the last 5 minutes' },
  { key: '15m', secs: 900, label: '15m', phrase: 'in the last 15 minutes' },
  { key: '1h', secs: 3600, label: '1h', phrase: 'in the last hour' },
  { key: '6h', secs: 6 * 3600, label: '6h', phrase: 'in the last 6 hours' },
  { key: '24h', secs: 24 * 3600, label: '24h', phrase: 'in the last 24 hours' },
  { key: '7d', secs: 7 * 86400, label: '7d', phrase: 'in the last 7 days' },
];

export const VIEWS = ['flame', 'diff', 'syscalls', 'locks'];
export const MODES = ['cpu', 'lock', 'syscall'];
export const FILTERS = ['node', 'namespace', 'pod', 'container', 'process', 'service'];
/** Which lock waits lock data shows (the API's `lock_class`): contention by default. */
export const LOCK_CLASSES = ['contention', 'waiting', 'all'];

/** Base of a diff: the range compared against. */
export const BASES = [
  { key: 'prev', label: 'the previous period', offset: null },
  { key: '1h', label: '1 hour earlier', offset: 3600 },
  { key: '1d', label: '1 day earlier', offset: 86400 },
  { key: '7d', label: '1 week earlier', offset: 7 * 86400 },
  { key: 'custom', label: 'a custom range', offset: null },
];

export const DEFAULTS = Object.freeze({
  view: 'flame',
  mode: 'cpu',
  type: '', // a pushed profile type id; empty: the agent's `mode`
  range: '15m',
  from: null, // unix seconds, custom ranges only
  to: null,
  node: '',
  namespace: '',
  pod: '',
  container: '',
  process: '',
  service: '',
  tag_key: '', // the tag filter: `tag.<tag_key>=<tag_value>` once both are chosen
  tag_value: '',
  lock_class: 'contention',
  q: '', // flame-graph search
  focus: '', // zoomed frame: names from the root, ';'-separated
  sort: 'self', // top functions: self | total | name
  base: 'prev',
  base_from: null,
  base_to: null,
});

/** A tag key as the API takes it. */
export const TAG_KEY = /^[A-Za-z0-9_.-]{1,128}$/;

/** A profile type id: five non-empty parts separated by `:`. */
export const TYPE_ID = /^[^:\s]+(:[^:\s]+){4}$/;

const int = (v) => (v !== null && /^\d+$/.test(v) ? Number(v) : null);
const oneOf = (v, list, d) => (list.includes(v) ? v : d);

/** Reads a state from a query string; unknown or bad values fall back to defaults. */
export function parse(search) {
  const p = new URLSearchParams(search);
  const s = { ...DEFAULTS };
  s.view = oneOf(p.get('view'), VIEWS, s.view);
  s.mode = oneOf(p.get('mode'), MODES, s.mode);
  s.type = TYPE_ID.test(p.get('type') || '') ? p.get('type') : '';
  if (s.type) s.mode = DEFAULTS.mode;
  s.range = oneOf(p.get('range'), [...PRESETS.map((x) => x.key), 'custom'], s.range);
  s.from = int(p.get('from'));
  s.to = int(p.get('to'));
  if (s.range === 'custom' && !(s.from !== null && s.to !== null && s.from < s.to)) s.range = DEFAULTS.range;
  if (s.range !== 'custom') s.from = s.to = null;
  for (const f of FILTERS) s[f] = p.get(f) || '';
  s.tag_key = TAG_KEY.test(p.get('tag_key') || '') ? p.get('tag_key') : '';
  s.tag_value = s.tag_key ? p.get('tag_value') || '' : '';
  s.lock_class = oneOf(p.get('lock_class'), LOCK_CLASSES, s.lock_class);
  s.q = p.get('q') || '';
  s.focus = p.get('focus') || '';
  s.sort = oneOf(p.get('sort'), ['self', 'total', 'name'], s.sort);
  s.base = oneOf(p.get('base'), BASES.map((b) => b.key), s.base);
  s.base_from = int(p.get('base_from'));
  s.base_to = int(p.get('base_to'));
  if (s.base === 'custom' && !(s.base_from !== null && s.base_to !== null && s.base_from < s.base_to)) s.base = 'prev';
  if (s.base !== 'custom') s.base_from = s.base_to = null;
  return s;
}

/** Writes a state as a query string, leaving defaults out. */
export function serialize(s) {
  const p = new URLSearchParams();
  for (const [k, d] of Object.entries(DEFAULTS)) {
    const v = s[k];
    if (v !== null && v !== undefined && v !== '' && v !== d) p.set(k, String(v));
  }
  const q = p.toString();
  return q ? `?${q}` : '';
}

/** The range as API parameters (relative presets stay relative, so a shared link means "now"). */
export function apiRange(s) {
  if (s.range === 'custom') return { from: String(s.from), to: String(s.to) };
  return { from: `-${s.range}`, to: 'now' };
}

/** The length of the selected range, seconds. */
export function rangeSecs(s) {
  if (s.range === 'custom') return s.to - s.from;
  return PRESETS.find((p) => p.key === s.range).secs;
}

/** The diff's base range as API parameters; empty means the API's default (previous period). */
export function apiBase(s) {
  if (s.base === 'custom') return { base_from: String(s.base_from), base_to: String(s.base_to) };
  const b = BASES.find((x) => x.key === s.base);
  if (!b || b.offset === null) return {};
  if (s.range === 'custom') return { base_from: String(s.from - b.offset), base_to: String(s.to - b.offset) };
  const len = rangeSecs(s);
  return { base_from: `-${len + b.offset}s`, base_to: `-${b.offset}s` };
}

/** What the profile routes read: the pushed `type`, or the agent's `mode`. */
export function apiWhich(s) {
  return s.type ? { type: s.type } : { mode: s.mode };
}

/** The key of the display rules (format.js `modeOf`): the type id or the mode. */
export function kindOf(s) {
  return s.type || s.mode;
}

/**
 * The active label filters (and a lock class other than the API's default) as API parameters
 * (`except`: one to leave out, `tag` for the tag filter).
 */
export function apiFilters(s, except) {
  const out = {};
  for (const f of FILTERS) if (s[f] && f !== except) out[f] = s[f];
  if (s.tag_key && s.tag_value && except !== 'tag') out[`tag.${s.tag_key}`] = s.tag_value;
  if (s.lock_class !== DEFAULTS.lock_class) out.lock_class = s.lock_class;
  return out;
}

/** The active filters as [label, value] pairs, for summaries. */
export function activeFilters(s) {
  const out = FILTERS.filter((f) => s[f]).map((f) => [f, s[f]]);
  if (s.tag_key && s.tag_value) out.push([s.tag_key, s.tag_value]);
  return out;
}

/** Whether the view shows lock waits, so the lock-class choice applies. */
export function showsLocks(s) {
  return s.view === 'locks' || (!s.type && s.mode === 'lock' && (s.view === 'flame' || s.view === 'diff'));
}

/** "in the last 15 minutes" or "between 2024-05-01 12:00 and 13:00". */
export function rangePhrase(s, fmt) {
  if (s.range !== 'custom') return PRESETS.find((p) => p.key === s.range).phrase;
  return `between ${fmt(s.from)} and ${fmt(s.to)}`;
}
