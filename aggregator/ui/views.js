// The four views: flame graph (with top functions), diff, syscalls, locks.
// Each loads its data for a state, and shows loading, empty and error
// states that say what is going on.

import { h, fill } from './dom.js';
import * as fmt from './format.js';
import { FlameGraph, diffColor } from './flame.js';
import { SortableTable } from './tables.js';
import { prepare, diffTree, pathOf } from './tree.js';
import { apiRange, apiFilters, apiBase, apiWhich, kindOf, rangePhrase, activeFilters, showsLocks, BASES } from './state.js';

/** Shows (or clears, with null) a loading / empty / error message over a panel body. */
export function showState(host, s) {
  const body = host.parentElement;
  body.classList.remove('has-empty', 'has-error', 'has-loading');
  if (!s) {
    host.hidden = true;
    host.className = 'state';
    host.replaceChildren();
    return;
  }
  body.classList.add(`has-${s.kind}`);
  host.hidden = false;
  host.className = `state state-${s.kind}`;
  fill(
    host,
    h(
      'div',
      { class: 'state-box', role: s.kind === 'error' ? 'alert' : 'status' },
      s.kind === 'loading' ? h('div', { class: 'spinner', 'aria-hidden': 'true' }) : h('div', { class: `state-icon icon-${s.kind}`, 'aria-hidden': 'true' }),
      h('div', { class: 'state-title' }, s.title),
      s.detail ? h('div', { class: 'state-detail' }, s.detail) : null,
      s.actions && s.actions.length ? h('div', { class: 'state-actions' }, s.actions.map((a) => h('button', { type: 'button', class: a.primary ? 'primary' : '', onclick: a.run }, a.label))) : null,
    ),
  );
}

function filterText(state) {
  return activeFilters(state).map(([f, v]) => `${f} = ${v}`).join(', ');
}

/** The empty state of a data view: what is missing, where, and what to try. */
export function emptyState(app, state, what) {
  const filtered = activeFilters(state).length > 0;
  const phrase = rangePhrase(state, fmt.dateTime);
  const actions = [];
  if (filtered) actions.push({ label: 'Clear filters', primary: true, run: () => app.clearFilters() });
  if (state.range !== '7d') actions.push({ label: 'Show the last 7 days', primary: !filtered, run: () => app.update({ range: '7d', from: null, to: null }) });
  if (showsLocks(state) && state.lock_class !== 'all') actions.push({ label: 'Show all lock waits', run: () => app.update({ lock_class: 'all' }) });
  return {
    kind: 'empty',
    title: `${what} ${filtered ? 'for these filters ' : ''}${phrase}`,
    detail: filtered
      ? `Filters: ${filterText(state)}. Try clearing them or a longer time range.`
      : 'Nothing was recorded in this time range. Check that agents are running and sending to this aggregator, or pick a longer range.',
    actions,
  };
}

/** The error state for a failed request. */
export function errorState(app, e) {
  return {
    kind: 'error',
    title: e.title || 'Something went wrong',
    detail: e.message,
    actions: [{ label: 'Retry', primary: true, run: () => app.reload() }],
  };
}

function loadingState(title) {
  return { kind: 'loading', title };
}

function row(label, value) {
  return h('tr', {}, h('th', {}, label), h('td', {}, value));
}

// ---------------------------------------------------------------- flame view

export class FlameView {
  constructor(app) {
    this.app = app;
    this.el = document.getElementById('view-flame');
    this.summary = document.getElementById('flame-summary');
    this.stateHost = document.getElementById('flame-state');
    this.crumbs = document.getElementById('flame-crumbs');
    this.searchInput = document.getElementById('search');
    this.searchShare = document.getElementById('search-share');
    this.resetButton = document.getElementById('reset-zoom');
    this.legend = document.getElementById('flame-legend');
    this.topHost = document.getElementById('top-table');
    this.topState = document.getElementById('top-state');
    this.topPanel = this.topHost.closest('.panel');
    this.data = null;
    this.graph = new FlameGraph(document.getElementById('flame-host'), {
      tooltip: app.tooltip,
      describe: (n) => this.describe(n),
      onFocus: (path) => {
        app.update({ focus: path }, { reload: false });
        this.drawCrumbs();
      },
      label: 'Flame graph: click a frame to zoom into it',
    });
    this.searchInput.addEventListener('input', () => app.update({ q: this.searchInput.value }, { reload: false, replace: true }));
    this.searchInput.addEventListener('keydown', (e) => {
      if (e.key === 'Escape') {
        this.searchInput.value = '';
        app.update({ q: '' }, { reload: false, replace: true });
      }
    });
    this.resetButton.addEventListener('click', () => this.graph.zoom(null));
    for (const b of this.el.querySelectorAll('[data-download]')) {
      b.addEventListener('click', () => this.download(b.dataset.download, b));
    }
    this.top = new SortableTable(this.topHost, {
      caption: 'Top functions',
      sort: { key: app.state.sort, desc: app.state.sort !== 'name' },
      onSort: (s) => {
        const refetch = s.key !== 'name' && s.key !== this.topBy;
        app.update({ sort: s.key }, { reload: false, replace: true });
        if (refetch) this.loadTop(app.state);
      },
      onRowClick: (r) => {
        this.top.selected = r.name;
        app.update({ q: r.name }, { reload: false });
        this.graph.canvas.scrollIntoView({ block: 'nearest', behavior: 'smooth' });
      },
      rowTitle: (r) => `Find ${r.name} in the flame graph`,
      columns: [
        { key: 'name', label: 'Function', render: (r) => h('span', { class: 'fn' }, r.name) },
        { key: 'self', label: 'Self', numeric: true, value: (r) => r.self, render: (r) => this.cellValue(r.self), share: (r) => this.share(r.self) },
        { key: 'total', label: 'Total', numeric: true, value: (r) => r.total, render: (r) => this.cellValue(r.total), share: (r) => this.share(r.total) },
      ],
    });
  }

  share(v) {
    return this.data && this.data.total ? v / this.data.total : 0;
  }

  cellValue(v) {
    const m = fmt.modeOf(this.mode);
    if (!v) return h('span', { class: 'muted' }, '–', h('span', { class: 'pct' }, ''));
    return h('span', {}, m.short(v), h('span', { class: 'muted pct' }, fmt.pct(this.share(v))));
  }

  async load(state, signal) {
    const m = fmt.modeOf(kindOf(state));
    this.mode = kindOf(state);
    const phrase = rangePhrase(state, fmt.dateTime);
    this.legend.dataset.mode = state.mode;
    showState(this.stateHost, loadingState(`Loading ${m.what} ${phrase}…`));
    this.el.classList.add('is-loading');
    const params = { ...apiWhich(state), ...apiRange(state), ...apiFilters(state) };
    this.el.dataset.mode = state.mode;
    const top = this.loadTop(state, signal);
    let fg;
    try {
      fg = await this.app.get('flamegraph', params, signal);
    } catch (e) {
      if (e.name !== 'AbortError') this.clear();
      throw e;
    } finally {
      this.el.classList.remove('is-loading');
    }
    this.data = prepare(fg.root);
    this.data.response = fg;
    if (!fg.root.value) {
      this.clear();
      this.summary.replaceChildren(h('span', { class: 'muted' }, `No data · ${fmt.span(fg.from, fg.to)}`));
      showState(this.stateHost, emptyState(this.app, state, kindOf(state) === 'cpu' ? 'No samples' : m.empty));
    } else {
      showState(this.stateHost, null);
      this.topPanel.hidden = false;
      this.graph.setData(this.data, { palette: state.mode, focus: state.focus, query: state.q });
      this.drawSummary(fg, state);
      this.drawCrumbs();
    }
    this.applyLocal(state);
    await top;
  }

  /** Empties the graph and hides the table, for the empty and error states. */
  clear() {
    this.data = null;
    this.graph.setData(prepare({ name: 'root', value: 0, self: 0, children: [] }));
    this.summary.replaceChildren();
    this.crumbs.replaceChildren();
    this.searchShare.hidden = true;
    this.topPanel.hidden = true;
  }

  async loadTop(state, signal) {
    const by = state.sort === 'name' ? 'total' : state.sort;
    this.topBy = by;
    const params = { ...apiWhich(state), ...apiRange(state), ...apiFilters(state), by, limit: 200 };
    showState(this.topState, loadingState('Loading top functions…'));
    try {
      const r = await this.app.get('top', params, signal);
      this.mode = kindOf(state);
      this.top.sort = { key: state.sort, desc: state.sort !== 'name' };
      this.top.setRows(r.functions);
      showState(this.topState, r.functions.length ? null : { kind: 'empty', title: 'No functions to rank in this range' });
    } catch (e) {
      if (e.name === 'AbortError') return;
      if (e.status === 401) throw e;
      this.top.setRows([]);
      showState(this.topState, errorState(this.app, e));
    }
  }

  drawSummary(fg, state) {
    const m = fmt.modeOf(kindOf(state));
    const root = fg.root;
    const parts = [];
    if (m.pushed) parts.push(h('strong', {}, m.value(root.value)), ` of ${m.measure}`);
    else if (kindOf(state) === 'cpu') parts.push(h('strong', {}, `${fmt.count(root.count)} samples`), ` (${fmt.duration(root.ns)} of CPU time)`);
    else parts.push(h('strong', {}, fmt.duration(root.ns)), ` ${m.measure} over ${fmt.count(root.count)} ${m.countName}`);
    parts.push(h('span', { class: 'dot' }, '·'), fmt.span(fg.from, fg.to));
    const f = filterText(state);
    if (f) parts.push(h('span', { class: 'dot' }, '·'), h('span', { class: 'muted' }, f));
    fill(this.summary, parts);
  }

  drawCrumbs() {
    if (!this.data || !this.data.total) return;
    const focus = this.graph.focus;
    const chain = [];
    for (let n = focus; n; n = n.parent) chain.unshift(n);
    const zoomed = chain.length > 1;
    this.resetButton.disabled = !zoomed;
    fill(
      this.crumbs,
      zoomed ? h('span', { class: 'muted' }, 'Zoomed into ') : h('span', { class: 'muted' }, 'Click a frame to zoom in; hover for details.'),
      zoomed
        ? chain.map((n, i) => [
            i ? h('span', { class: 'sep', 'aria-hidden': 'true' }, '›') : null,
            i === chain.length - 1 ? h('strong', {}, n.name) : h('button', { type: 'button', class: 'crumb', onclick: () => this.graph.zoom(n) }, n.parent ? n.name : 'all'),
          ])
        : null,
      zoomed ? h('span', { class: 'muted crumb-share' }, `${fmt.pct(focus.value / this.data.total)} of total`) : null,
    );
  }

  /** Applies what needs no new data: search box, highlight, zoom. */
  applyLocal(state) {
    if (this.searchInput.value !== state.q) this.searchInput.value = state.q;
    if (!this.data || !this.data.total) {
      this.searchShare.hidden = true;
      return;
    }
    const want = state.focus || '';
    if (pathOf(this.graph.focus) !== want) {
      this.graph.focus = this.graph.nodeAt(want);
      this.drawCrumbs();
    }
    const r = this.graph.setSearch(state.q);
    this.top.selected = state.q || null;
    this.top.render();
    const share = this.searchShare;
    if (!state.q.trim()) {
      share.hidden = true;
      return;
    }
    share.hidden = false;
    const m = fmt.modeOf(kindOf(state));
    if (!r.frames) {
      share.className = 'search-share none';
      share.textContent = `No frame matches “${state.q.trim()}”`;
      return;
    }
    share.className = 'search-share';
    fill(
      share,
      h('strong', {}, `${fmt.pct(r.share)} of total`),
      ` · ${m.short(r.value)}${kindOf(state) === 'cpu' ? ' samples' : ''} · ${r.frames} ${r.frames === 1 ? 'frame' : 'frames'}`,
      r.names > 1 ? ` in ${r.names} functions` : '',
    );
  }

  describe(n) {
    const m = fmt.modeOf(this.mode);
    const total = this.graph.data.total;
    const isRoot = !n.parent;
    const rows = [];
    if (m.pushed) {
      rows.push(row('Total', m.value(n.value)));
      rows.push(row('Self', m.value(n.self)));
    } else if (this.mode === 'cpu') {
      rows.push(row('Total', `${fmt.count(n.value)} samples · ${fmt.duration(n.ns)} CPU`));
      rows.push(row('Self', `${fmt.count(n.self)} samples`));
    } else {
      rows.push(row('Total', `${fmt.duration(n.value)} · ${fmt.count(n.count)} ${m.countName}`));
      rows.push(row('Self', fmt.duration(n.self)));
    }
    rows.push(row('Of total', h('strong', {}, fmt.pct(n.value / total))));
    if (!isRoot) rows.push(row('Of parent', `${fmt.pct(n.parent.value ? n.value / n.parent.value : 0)}${n.parent.parent ? ` of ${n.parent.name}` : ''}`));
    return [
      h('div', { class: 'tt-name' }, isRoot ? 'all' : n.name),
      isRoot ? h('div', { class: 'tt-kind' }, m.title) : h('div', { class: `tt-kind ${n.kernel ? 'kernel' : 'user'}` }, n.kernel ? 'kernel frame' : 'user frame'),
      h('table', { class: 'tt-rows' }, rows),
      h('div', { class: 'tt-hint' }, n === this.graph.focus && n.parent ? 'Click to zoom out' : 'Click to zoom in'),
    ];
  }

  async download(format, button) {
    const s = this.app.state;
    const params = { ...apiWhich(s), ...apiRange(s), ...apiFilters(s), format };
    const ext = { pprof: 'pb.gz', folded: 'folded.txt', svg: 'svg' }[format];
    const name = `aperture-${s.mode}-${new Date().toISOString().slice(0, 16).replace(/[:T]/g, '')}.${ext}`;
    button.disabled = true;
    try {
      await this.app.withAuth(() => this.app.api.download('profile', params, name));
    } catch (e) {
      this.app.toast(`Download failed: ${e.message}`);
    } finally {
      button.disabled = false;
    }
  }
}

// ----------------------------------------------------------------- diff view

export class DiffView {
  constructor(app) {
    this.app = app;
    this.el = document.getElementById('view-diff');
    this.summary = document.getElementById('diff-summary');
    this.stateHost = document.getElementById('diff-state');
    this.baseSelect = document.getElementById('diff-base');
    this.customBox = document.getElementById('diff-custom');
    this.changesHost = document.getElementById('diff-table');
    this.data = null;
    for (const b of BASES) this.baseSelect.append(h('option', { value: b.key }, b.label));
    this.baseSelect.addEventListener('change', () => {
      const key = this.baseSelect.value;
      if (key === 'custom') {
        this.customBox.hidden = false;
        this.fillCustom(app.state);
        return;
      }
      app.update({ base: key, base_from: null, base_to: null });
    });
    document.getElementById('diff-apply').addEventListener('click', () => {
      const from = fmt.fromLocalInput(document.getElementById('diff-from').value);
      const to = fmt.fromLocalInput(document.getElementById('diff-to').value);
      if (!(from < to)) {
        app.toast('The base range must start before it ends.');
        return;
      }
      app.update({ base: 'custom', base_from: from, base_to: to });
    });
    this.graph = new FlameGraph(document.getElementById('diff-host'), {
      tooltip: app.tooltip,
      describe: (n) => this.describe(n),
      onFocus: () => {},
      label: 'Diff flame graph: red frames grew, blue frames shrank',
    });
    this.changes = new SortableTable(this.changesHost, {
      caption: 'Largest changes',
      sort: { key: 'change', desc: true },
      columns: [
        { key: 'stack', label: 'Stack (leaf last)', value: (r) => r.stack, render: (r) => stackCell(r.stack) },
        { key: 'baseShare', label: 'Base', numeric: true, render: (r) => h('span', {}, this.short(r.base), h('span', { class: 'muted pct' }, fmt.pct(r.baseShare))) },
        { key: 'curShare', label: 'Current', numeric: true, render: (r) => h('span', {}, this.short(r.value), h('span', { class: 'muted pct' }, fmt.pct(r.curShare))) },
        { key: 'change', label: 'Change of share', numeric: true, value: (r) => Math.abs(r.change), render: (r) => changeBadge(r.change, this.data ? this.data.maxAbsDelta : 0) },
      ],
    });
  }

  short(v) {
    const m = fmt.modeOf(this.mode);
    return m.short(v);
  }

  fillCustom(state) {
    const now = Math.floor(Date.now() / 1000);
    const len = state.range === 'custom' ? state.to - state.from : null;
    const from = state.base_from ?? (state.range === 'custom' ? state.from - len : now - 7200);
    const to = state.base_to ?? (state.range === 'custom' ? state.from : now - 3600);
    document.getElementById('diff-from').value = fmt.toLocalInput(from);
    document.getElementById('diff-to').value = fmt.toLocalInput(to);
  }

  async load(state, signal) {
    this.mode = kindOf(state);
    const m = fmt.modeOf(kindOf(state));
    this.baseSelect.value = state.base;
    this.customBox.hidden = state.base !== 'custom';
    if (state.base === 'custom') this.fillCustom(state);
    showState(this.stateHost, loadingState(`Comparing ${m.what}…`));
    const params = { ...apiWhich(state), ...apiRange(state), ...apiFilters(state), ...apiBase(state), limit: 10000 };
    const d = await this.app.get('diff', params, signal);
    this.response = d;
    const baseText = `${fmt.span(d.base.from, d.base.to)}`;
    const curText = `${fmt.span(d.current.from, d.current.to)}`;
    if (!d.stacks.length) {
      this.graph.setData(prepare({ name: 'root', value: 0, children: [] }));
      this.changes.setRows([]);
      this.summary.textContent = '';
      const empty = emptyState(this.app, state, kindOf(state) === 'cpu' ? 'No samples' : m.empty);
      empty.title = `${kindOf(state) === 'cpu' ? 'No samples' : m.empty} to compare: nothing in ${baseText} nor in ${curText}`;
      showState(this.stateHost, empty);
      return;
    }
    showState(this.stateHost, null);
    this.data = diffTree(d.stacks);
    this.graph.setData(this.data, { diff: true });
    const side = (label, cls, total, text) =>
      h('span', { class: `diff-side ${cls}` }, h('span', { class: 'diff-side-label' }, label), ` ${text}: `, h('strong', {}, kindOf(state) === 'cpu' ? `${fmt.count(total)} samples` : m.pushed ? m.value(total) : fmt.duration(total)));
    const lonely = !this.data.baseTotal ? 'The base range has no data: every frame shows as new.' : !this.data.curTotal ? 'The selected range has no data: every frame shows as gone.' : null;
    fill(
      this.summary,
      side('Base', 'base', this.data.baseTotal, baseText),
      h('span', { class: 'dot' }, 'vs'),
      side('Current', 'current', this.data.curTotal, curText),
      lonely ? h('span', { class: 'notice' }, lonely) : null,
    );
    const rows = d.stacks.map((s) => {
      const baseShare = this.data.baseTotal ? s.base / this.data.baseTotal : 0;
      const curShare = this.data.curTotal ? s.value / this.data.curTotal : 0;
      return { ...s, baseShare, curShare, change: curShare - baseShare };
    });
    rows.sort((a, b) => Math.abs(b.change) - Math.abs(a.change));
    this.changes.setRows(rows.slice(0, 25));
  }

  applyLocal() {}

  describe(n) {
    const d = this.data;
    const fmtSide = (v, share) => `${this.short(v)}${this.mode === 'cpu' ? ' samples' : ''} (${fmt.pct(share)})`;
    const ratio = n.baseShare ? n.curShare / n.baseShare : null;
    return [
      h('div', { class: 'tt-name' }, n.parent ? n.name : 'all'),
      h('div', { class: `tt-kind ${n.delta > 0.0005 ? 'up' : n.delta < -0.0005 ? 'down' : ''}` }, n.delta > 0.0005 ? 'grew' : n.delta < -0.0005 ? 'shrank' : 'unchanged'),
      h(
        'table',
        { class: 'tt-rows' },
        row('Base', fmtSide(n.base, n.baseShare)),
        row('Current', fmtSide(n.cur, n.curShare)),
        row('Change', h('strong', {}, `${fmt.points(n.delta)}${ratio !== null && n.parent ? ` (×${ratio.toFixed(2)})` : n.base === 0 && n.cur > 0 ? ' (new)' : ''}`)),
      ),
      h('div', { class: 'tt-hint' }, 'Shares are of each range’s own total'),
    ];
  }
}

function stackCell(stack) {
  const names = stack.split(';');
  const leaf = names.pop();
  const shown = names.length > 3 ? ['…', ...names.slice(-3)] : names;
  return h('span', { class: 'stack', title: stack.split(';').join(' → ') }, shown.length ? h('span', { class: 'muted' }, `${shown.join(' › ')} › `) : null, h('span', { class: 'fn' }, leaf));
}

function changeBadge(change, maxAbs) {
  const b = h('span', { class: `change ${change > 0 ? 'up' : change < 0 ? 'down' : ''}` }, fmt.points(change));
  b.style.backgroundColor = diffColor(change, maxAbs);
  return b;
}

// ------------------------------------------------------------- syscall view

export class SyscallsView {
  constructor(app) {
    this.app = app;
    this.stateHost = document.getElementById('syscalls-state');
    this.summary = document.getElementById('syscalls-summary');
    this.total = 0;
    this.table = new SortableTable(document.getElementById('syscalls-table'), {
      caption: 'System calls',
      sort: { key: 'total_ns', desc: true },
      columns: [
        { key: 'name', label: 'Syscall', render: (r) => h('span', { class: 'fn' }, r.name) },
        { key: 'count', label: 'Calls', numeric: true, render: (r) => fmt.count(r.count) },
        { key: 'errors', label: 'Errors', numeric: true, render: (r) => (r.errors ? h('span', { class: 'err' }, fmt.count(r.errors)) : h('span', { class: 'muted' }, '0')) },
        { key: 'rate', label: 'Error rate', numeric: true, value: (r) => (r.count ? r.errors / r.count : 0), render: (r) => (r.errors ? fmt.pct(r.errors / r.count) : h('span', { class: 'muted' }, '–')) },
        { key: 'p50_ns', label: 'p50', numeric: true, render: (r) => fmt.duration(r.p50_ns) },
        { key: 'p90_ns', label: 'p90', numeric: true, render: (r) => fmt.duration(r.p90_ns) },
        { key: 'p99_ns', label: 'p99', numeric: true, render: (r) => fmt.duration(r.p99_ns) },
        { key: 'total_ns', label: 'Total time', numeric: true, render: (r) => fmt.duration(r.total_ns), share: (r) => (this.total ? r.total_ns / this.total : 0) },
      ],
    });
  }

  async load(state, signal) {
    showState(this.stateHost, loadingState(`Loading system calls ${rangePhrase(state, fmt.dateTime)}…`));
    const r = await this.app.get('syscalls', { ...apiRange(state), ...apiFilters(state), limit: 1000 }, signal);
    const rows = r.syscalls;
    this.total = rows.reduce((a, x) => a + x.total_ns, 0);
    this.table.setRows(rows);
    if (!rows.length) {
      this.summary.textContent = '';
      showState(this.stateHost, emptyState(this.app, state, 'No system calls recorded'));
      return;
    }
    showState(this.stateHost, null);
    const calls = rows.reduce((a, x) => a + x.count, 0);
    const errors = rows.reduce((a, x) => a + x.errors, 0);
    fill(
      this.summary,
      h('strong', {}, `${fmt.count(calls)} calls`),
      ` of ${rows.length} syscalls · `,
      h('strong', {}, fmt.duration(this.total)),
      ' in total · ',
      errors ? h('span', { class: 'err' }, `${fmt.count(errors)} errors (${fmt.pct(errors / calls)})`) : 'no errors',
      h('span', { class: 'dot' }, '·'),
      fmt.span(r.from, r.to),
    );
  }

  applyLocal() {}
}

// ---------------------------------------------------------------- lock view

export class LocksView {
  constructor(app) {
    this.app = app;
    this.stateHost = document.getElementById('locks-state');
    this.summary = document.getElementById('locks-summary');
    this.total = 0;
    this.table = new SortableTable(document.getElementById('locks-table'), {
      caption: 'Contended call sites',
      sort: { key: 'wait_ns', desc: true },
      onRowClick: (r) => app.update({ view: 'flame', mode: 'lock', q: callSite(r), focus: '' }),
      rowTitle: (r) => `${r.stack.split(';').join(' → ')}\nClick to find it in the lock flame graph`,
      columns: [
        { key: 'stack', label: 'Call site', value: (r) => callSite(r), render: (r) => siteCell(r) },
        { key: 'kind', label: 'Lock', value: (r) => lockLabel(r.kind), render: (r) => h('span', { class: `tag ${r.kind.startsWith('kernel_') ? 'kernel' : 'user'}`, title: LOCK_TITLES[r.kind] || '' }, lockLabel(r.kind)) },
        { key: 'count', label: 'Waits', numeric: true, render: (r) => fmt.count(r.count) },
        { key: 'wait_ns', label: 'Total wait', numeric: true, render: (r) => fmt.duration(r.wait_ns), share: (r) => (this.total ? r.wait_ns / this.total : 0) },
        { key: 'avg', label: 'Mean wait', numeric: true, value: (r) => (r.count ? r.wait_ns / r.count : 0), render: (r) => fmt.duration(r.count ? r.wait_ns / r.count : 0) },
        { key: 'max_wait_ns', label: 'Longest', numeric: true, render: (r) => fmt.duration(r.max_wait_ns) },
      ],
    });
  }

  async load(state, signal) {
    showState(this.stateHost, loadingState(`Loading lock waits ${rangePhrase(state, fmt.dateTime)}…`));
    const r = await this.app.get('locks', { ...apiRange(state), ...apiFilters(state), limit: 500 }, signal);
    const rows = r.sites;
    this.total = rows.reduce((a, x) => a + x.wait_ns, 0);
    this.table.setRows(rows);
    if (!rows.length) {
      this.summary.textContent = '';
      showState(this.stateHost, emptyState(this.app, state, 'No lock waits'));
      return;
    }
    showState(this.stateHost, null);
    const waits = rows.reduce((a, x) => a + x.count, 0);
    fill(
      this.summary,
      h('strong', {}, fmt.duration(this.total)),
      ` waited over ${fmt.count(waits)} waits at ${rows.length} call ${rows.length === 1 ? 'site' : 'sites'}`,
      h('span', { class: 'dot' }, '·'),
      fmt.span(r.from, r.to),
    );
  }

  applyLocal() {}
}

/** How a lock class (the API's `kind`) is shown, and what it means. */
const LOCK_LABELS = { futex: 'other futex', condvar: 'condition variable', join: 'thread join' };
const LOCK_TITLES = {
  mutex: 'A mutex another thread held (pthread_mutex_lock, Rust Mutex…): contention',
  rwlock: 'A reader-writer lock another thread held: contention',
  condvar: 'Waiting on a condition variable (pthread_cond_wait, Rust Condvar…): usually idle, not contention',
  semaphore: 'Waiting on a semaphore (sem_wait): usually idle, not contention',
  join: 'Waiting for another thread to end (pthread_join)',
  futex: 'A futex wait of no recognised kind (or from an agent that does not classify waits)',
};

export function lockLabel(kind) {
  return LOCK_LABELS[kind] || kind.replace('_', ' ');
}

/** The frame that called into the lock: the caller of the lock's own frames. */
const LOCK_FRAMES = /(futex|mutex|lock|sem|spin|wait|park|acquire|__lll_|pthread_cond)/i;

export function callSite(site) {
  const names = site.stack.split(';');
  for (let i = names.length - 1; i >= 0; i--) if (!LOCK_FRAMES.test(names[i])) return names[i];
  return site.function;
}

function siteCell(r) {
  const names = r.stack.split(';');
  const site = callSite(r);
  const at = names.lastIndexOf(site);
  const below = at >= 0 ? names.slice(at + 1) : [r.function];
  return h('div', { class: 'site' }, h('span', { class: 'fn' }, site), below.length ? h('span', { class: 'muted site-lock' }, ` → ${below.join(' → ')}`) : null);
}
