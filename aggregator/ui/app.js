// Aperture web UI: wires the controls, the URL state, the views and the
// token prompt together.

import * as api from './api.js';
import { h, fill } from './dom.js';
import * as fmt from './format.js';
import * as st from './state.js';
import { FlameView, DiffView, SyscallsView, LocksView, errorState, showState } from './views.js';

const FILTER_LABELS = { node: 'Node', namespace: 'Namespace', pod: 'Pod', container: 'Container', process: 'Process', service: 'Service' };
const FILTER_ALL = { node: 'All nodes', namespace: 'All namespaces', pod: 'All pods', container: 'All containers', process: 'All processes', service: 'All services', tag_key: 'Any tag', tag_value: 'Any value' };
const VIEW_USES_MODE = { flame: true, diff: true, syscalls: false, locks: false };

class App {
  constructor() {
    // Before anything can send a request: a sign-in link's token moves
    // from the address bar into session storage.
    api.adoptTokenFromFragment();
    this.api = api;
    this.state = st.parse(location.search);
    this.tooltip = document.getElementById('tooltip');
    this.controller = null;
    this.tokenWaiters = null;
    this.views = {
      flame: new FlameView(this),
      diff: new DiffView(this),
      syscalls: new SyscallsView(this),
      locks: new LocksView(this),
    };
    this.buildControls();
    this.buildTokenDialog();
    window.addEventListener('popstate', () => {
      this.state = st.parse(location.search);
      this.syncControls();
      this.load();
    });
    history.replaceState(null, '', st.serialize(this.state) || location.pathname);
    this.syncControls();
    this.load();
  }

  // ---------------------------------------------------------------- state

  /**
   * Changes the state, records it in the URL (a new history entry unless
   * `replace`), and reloads the data unless `reload` is false.
   */
  update(patch, { reload = true, replace = false } = {}) {
    const next = { ...this.state, ...patch };
    if ('mode' in patch || 'type' in patch || 'range' in patch || 'from' in patch || 'tag_value' in patch || 'lock_class' in patch || st.FILTERS.some((f) => f in patch)) {
      if (!('focus' in patch)) next.focus = '';
    }
    this.state = next;
    const url = st.serialize(next) || location.pathname;
    if (url !== location.search) {
      if (replace) history.replaceState(null, '', url);
      else history.pushState(null, '', url);
    }
    this.syncControls();
    if (reload) this.load();
    else this.views[next.view].applyLocal(next);
  }

  clearFilters() {
    const patch = {};
    for (const f of st.FILTERS) patch[f] = '';
    this.update({ ...patch, tag_key: '', tag_value: '' });
  }

  reload() {
    this.load();
  }

  // ------------------------------------------------------------- requests

  /** GET JSON, asking for a token (and retrying) when the API answers 401. */
  get(path, params, signal) {
    return this.withAuth(() => api.getJson(path, params, signal));
  }

  async withAuth(run) {
    for (;;) {
      try {
        const r = await run();
        this.setSignedIn(!!api.token.get());
        return r;
      } catch (e) {
        if (e.status !== 401) throw e;
        await this.askToken(api.token.get() ? 'The aggregator rejected this token. Check it and try again.' : null);
      }
    }
  }

  async load() {
    if (this.controller) this.controller.abort();
    const controller = new AbortController();
    this.controller = controller;
    const state = this.state;
    const view = this.views[state.view];
    this.loadFilters(state, controller.signal);
    try {
      await view.load(state, controller.signal);
    } catch (e) {
      if (e.name === 'AbortError' || controller.signal.aborted) return;
      const host = document.getElementById(`${state.view}-state`);
      showState(host, errorState(this, e));
    }
  }

  // -------------------------------------------------------------- filters

  async loadFilters(state, signal) {
    const base = { ...st.apiRange(state) };
    if (VIEW_USES_MODE[state.view]) Object.assign(base, st.apiWhich(state));
    await Promise.all([
      this.loadTypes(state, signal),
      ...st.FILTERS.map(async (name) => {
        const select = this.filterSelects[name];
        try {
          const r = await this.get(`labels/${name}/values`, { ...base, ...st.apiFilters(state, name) }, signal);
          this.fillSelect(select, name, r.values, state[name]);
        } catch (e) {
          if (e.name === 'AbortError') return;
          this.fillSelect(select, name, [], state[name]);
          select.title = `Could not load values: ${e.message}`;
        }
      }),
      this.loadTagFilter(state, base, signal),
    ]);
  }

  /** The tag filter: the tag keys there are, then the chosen key's values. */
  async loadTagFilter(state, base, signal) {
    const others = { ...base, ...st.apiFilters(state, 'tag') };
    const lists = [
      [this.tagKeySelect, 'tag_key', 'labels/tag/values', state.tag_key],
      [this.tagValueSelect, 'tag_value', state.tag_key ? `labels/tag.${state.tag_key}/values` : null, state.tag_value],
    ];
    await Promise.all(lists.map(async ([select, name, path, current]) => {
      if (!path) {
        this.fillSelect(select, name, [], current);
        return;
      }
      try {
        const r = await this.get(path, others, signal);
        this.fillSelect(select, name, r.values, current);
      } catch (e) {
        if (e.name === 'AbortError') return;
        this.fillSelect(select, name, [], current);
        select.title = `Could not load values: ${e.message}`;
      }
    }));
    this.tagKeySelect.closest('.filter').classList.toggle('active', !!(state.tag_key && state.tag_value));
  }

  /** Fills the type picker with the pushed profile types there is data of. */
  async loadTypes(state, signal) {
    const select = this.typeSelect;
    let ids = [];
    try {
      const r = await this.get('types', st.apiRange(state), signal);
      ids = r.types.filter((t) => t.mode === null).map((t) => t.id);
    } catch (e) {
      if (e.name === 'AbortError') return;
      select.title = `Could not load the profile types: ${e.message}`;
    }
    const opts = ids.map((id) => h('option', { value: id }, id));
    if (state.type && !ids.includes(state.type)) opts.unshift(h('option', { value: state.type }, `${state.type} (no data)`));
    fill(select, h('option', { value: '' }, 'Agent (by mode)'), opts);
    select.value = state.type;
    select.title = ids.length ? `${ids.length} pushed ${ids.length === 1 ? 'type' : 'types'} in this range (Pyroscope SDKs)` : 'No pushed profiles in this range';
  }

  fillSelect(select, name, values, current) {
    const all = h('option', { value: '' }, FILTER_ALL[name]);
    const opts = values.map((v) => h('option', { value: v }, v));
    if (current && !values.includes(current)) opts.unshift(h('option', { value: current }, `${current} (no data)`));
    fill(select, all, opts);
    select.value = current;
    select.disabled = !values.length && !current;
    select.title = values.length ? `${values.length} ${values.length === 1 ? 'value' : 'values'} in this range` : 'No values in this range';
    select.closest('.filter').classList.toggle('active', !!current);
  }

  // ------------------------------------------------------------- controls

  buildControls() {
    for (const b of document.querySelectorAll('[data-view]')) {
      b.addEventListener('click', () => this.update({ view: b.dataset.view }));
    }
    for (const b of document.querySelectorAll('[data-mode]')) {
      b.addEventListener('click', () => this.update({ mode: b.dataset.mode, type: '', q: '' }));
    }
    for (const b of document.querySelectorAll('[data-lock-class]')) {
      b.addEventListener('click', () => this.update({ lock_class: b.dataset.lockClass }));
    }
    this.typeSelect = document.getElementById('type-select');
    this.typeSelect.addEventListener('change', () => this.update({ type: this.typeSelect.value, mode: st.DEFAULTS.mode, q: '' }));
    const presets = document.getElementById('presets');
    for (const p of st.PRESETS) {
      presets.append(h('button', { type: 'button', dataset: { range: p.key }, title: `The ${p.phrase.replace('in the ', '')}`, onclick: () => this.update({ range: p.key, from: null, to: null }) }, p.label));
    }
    presets.append(h('button', { type: 'button', dataset: { range: 'custom' }, title: 'Pick a start and an end', onclick: () => this.openCustom() }, 'Custom'));
    document.getElementById('custom-apply').addEventListener('click', () => {
      const from = fmt.fromLocalInput(document.getElementById('custom-from').value);
      const to = fmt.fromLocalInput(document.getElementById('custom-to').value);
      if (!(from < to)) {
        this.toast('The range must start before it ends.');
        return;
      }
      this.update({ range: 'custom', from, to });
    });
    document.getElementById('custom-cancel').addEventListener('click', () => {
      document.getElementById('custom-range').hidden = true;
      this.syncControls();
    });
    document.getElementById('refresh').addEventListener('click', () => this.reload());
    const filters = document.getElementById('filter-list');
    this.filterSelects = {};
    for (const name of st.FILTERS) {
      const select = h('select', { id: `filter-${name}`, name, onchange: () => this.update({ [name]: select.value }) }, h('option', { value: '' }, FILTER_ALL[name]));
      this.filterSelects[name] = select;
      filters.append(h('label', { class: 'filter' }, h('span', { class: 'filter-label' }, FILTER_LABELS[name]), select));
    }
    // The tag filter (pushed profiles' tags): a key, then one of its values.
    this.tagKeySelect = h('select', { id: 'filter-tag-key', name: 'tag_key', 'aria-label': 'Tag key', onchange: () => this.update({ tag_key: this.tagKeySelect.value, tag_value: '' }) }, h('option', { value: '' }, FILTER_ALL.tag_key));
    this.tagValueSelect = h('select', { id: 'filter-tag-value', name: 'tag_value', 'aria-label': 'Tag value', disabled: true, onchange: () => this.update({ tag_value: this.tagValueSelect.value }) }, h('option', { value: '' }, FILTER_ALL.tag_value));
    filters.append(h('label', { class: 'filter filter-tag', title: 'Tags of pushed profiles (Pyroscope SDKs)' }, h('span', { class: 'filter-label' }, 'Tag'), this.tagKeySelect, h('span', { class: 'filter-eq', 'aria-hidden': 'true' }, '='), this.tagValueSelect));
    document.getElementById('clear-filters').addEventListener('click', () => this.clearFilters());
    document.addEventListener('keydown', (e) => {
      if (e.key === '/' && document.activeElement.tagName !== 'INPUT' && this.state.view === 'flame') {
        e.preventDefault();
        document.getElementById('search').focus();
      }
    });
  }

  openCustom() {
    const box = document.getElementById('custom-range');
    box.hidden = false;
    const now = Math.floor(Date.now() / 1000);
    const s = this.state;
    const from = s.range === 'custom' ? s.from : now - st.rangeSecs(s);
    const to = s.range === 'custom' ? s.to : now;
    document.getElementById('custom-from').value = fmt.toLocalInput(from);
    document.getElementById('custom-to').value = fmt.toLocalInput(to);
    for (const b of document.querySelectorAll('#presets button')) b.setAttribute('aria-pressed', String(b.dataset.range === 'custom'));
    document.getElementById('custom-from').focus();
  }

  syncControls() {
    const s = this.state;
    for (const b of document.querySelectorAll('[data-view]')) {
      const on = b.dataset.view === s.view;
      b.setAttribute('aria-selected', String(on));
      b.classList.toggle('active', on);
    }
    for (const v of st.VIEWS) document.getElementById(`view-${v}`).hidden = v !== s.view;
    for (const b of document.querySelectorAll('[data-mode]')) b.setAttribute('aria-pressed', String(!s.type && b.dataset.mode === s.mode));
    if (s.type && !Array.from(this.typeSelect.options).some((o) => o.value === s.type)) this.typeSelect.append(h('option', { value: s.type }, s.type));
    this.typeSelect.value = s.type;
    const modeGroup = document.getElementById('mode-group');
    modeGroup.classList.toggle('inactive', !VIEW_USES_MODE[s.view]);
    modeGroup.title = VIEW_USES_MODE[s.view] ? '' : 'This view does not depend on the mode';
    document.getElementById('lock-class-group').hidden = !st.showsLocks(s);
    for (const b of document.querySelectorAll('[data-lock-class]')) b.setAttribute('aria-pressed', String(b.dataset.lockClass === s.lock_class));
    for (const b of document.querySelectorAll('#presets button')) b.setAttribute('aria-pressed', String(b.dataset.range === s.range));
    const custom = document.getElementById('custom-range');
    if (s.range === 'custom') {
      custom.hidden = false;
      document.getElementById('custom-from').value = fmt.toLocalInput(s.from);
      document.getElementById('custom-to').value = fmt.toLocalInput(s.to);
    } else if (!custom.contains(document.activeElement)) {
      custom.hidden = true;
    }
    let active = 0;
    for (const f of st.FILTERS) {
      const sel = this.filterSelects[f];
      if (s[f] && !Array.from(sel.options).some((o) => o.value === s[f])) sel.append(h('option', { value: s[f] }, s[f]));
      sel.value = s[f];
      sel.closest('.filter').classList.toggle('active', !!s[f]);
      if (s[f]) active++;
    }
    for (const [sel, v] of [[this.tagKeySelect, s.tag_key], [this.tagValueSelect, s.tag_value]]) {
      if (v && !Array.from(sel.options).some((o) => o.value === v)) sel.append(h('option', { value: v }, v));
      sel.value = v;
    }
    this.tagValueSelect.disabled = !s.tag_key;
    this.tagKeySelect.closest('.filter').classList.toggle('active', !!(s.tag_key && s.tag_value));
    if (s.tag_key && s.tag_value) active++;
    document.getElementById('clear-filters').hidden = !active;
    const m = fmt.modeOf(st.kindOf(s));
    const lockTitle = { contention: 'Lock contention', waiting: 'Lock waits (waiting)', all: 'Lock waits' }[s.lock_class];
    const viewTitle = { flame: m.title, diff: `${m.title} diff`, syscalls: 'System calls', locks: lockTitle }[s.view];
    document.title = `${viewTitle} · Aperture`;
  }

  // ---------------------------------------------------------------- token

  buildTokenDialog() {
    this.dialog = document.getElementById('token-dialog');
    const form = document.getElementById('token-form');
    const input = document.getElementById('token-input');
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      const t = input.value.trim();
      if (!t) {
        this.tokenError('Enter the token first.');
        return;
      }
      api.token.set(t);
      this.dialog.close();
      const waiters = this.tokenWaiters || [];
      this.tokenWaiters = null;
      for (const w of waiters) w();
    });
    this.dialog.addEventListener('cancel', (e) => e.preventDefault());
    document.getElementById('token-button').addEventListener('click', () => {
      api.token.clear();
      this.setSignedIn(false);
      this.reload();
    });
  }

  tokenError(message) {
    const el = document.getElementById('token-error');
    el.textContent = message || '';
    el.hidden = !message;
  }

  /** Shows the token prompt; resolves once a token was entered. */
  askToken(message) {
    return new Promise((resolve) => {
      if (this.tokenWaiters) {
        this.tokenWaiters.push(resolve);
        return;
      }
      this.tokenWaiters = [resolve];
      this.tokenError(message);
      const input = document.getElementById('token-input');
      input.value = '';
      if (!this.dialog.open) this.dialog.showModal();
      input.focus();
      for (const v of st.VIEWS) {
        const host = document.getElementById(`${v}-state`);
        if (host && !host.hidden && host.classList.contains('state-loading')) showState(host, { kind: 'loading', title: 'Waiting for an access token…' });
      }
    });
  }

  setSignedIn(on) {
    document.getElementById('token-button').hidden = !on;
  }

  toast(message) {
    const t = document.getElementById('toast');
    t.textContent = message;
    t.hidden = false;
    clearTimeout(this.toastTimer);
    this.toastTimer = setTimeout(() => {
      t.hidden = true;
    }, 5000);
  }
}

const app = new App();
// For tests and the browser console.
window.aperture = {
  app,
  flame: app.views.flame.graph,
  diff: app.views.diff.graph,
};
