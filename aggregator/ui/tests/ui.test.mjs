// Browser test of the Aperture web UI against the fixture aggregator
// (aggregator/examples/ui_fixture.rs, whose doc lists the data and shares).
// Run through run.sh, which starts the fixture and sets:
//   APERTURE_UI_URL    e.g. http://127.0.0.1:43211
//   APERTURE_UI_TOKEN  the fixture's bearer token
// Prints one line per check, then `N passed, M failed`.

import { mkdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const BASE = process.env.APERTURE_UI_URL;
const TOKEN = process.env.APERTURE_UI_TOKEN;
if (!BASE || !TOKEN) {
  console.error('APERTURE_UI_URL and APERTURE_UI_TOKEN must be set (run.sh sets them)');
  console.log('0 passed, 1 failed');
  process.exit(1);
}
const ARTIFACTS = fileURLToPath(new URL('./artifacts/', import.meta.url));
mkdirSync(ARTIFACTS, { recursive: true });

let passed = 0;
let failed = 0;
let page;

function assert(cond, message) {
  if (!cond) throw new Error(message);
}

function near(actual, want, tolerance, what) {
  assert(Math.abs(actual - want) <= tolerance, `${what}: expected ${want} ± ${tolerance}, got ${actual}`);
}

async function shot(name) {
  await page.screenshot({ path: `${ARTIFACTS}${name}.png`, fullPage: true });
}

async function test(name, fn) {
  const started = Date.now();
  try {
    await fn();
    passed++;
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed++;
    console.log(`FAIL ${name}\n     ${String(e && e.stack ? e.stack : e).split('\n').slice(0, 4).join('\n     ')}`);
    await shot(`failed-${name.replace(/[^a-z0-9]+/gi, '-').toLowerCase()}`).catch(() => {});
  }
}

// ------------------------------------------------------------------ helpers

const graphs = { flame: '#flame-host canvas', diff: '#diff-host canvas' };

async function frames(which = 'flame') {
  return page.evaluate((w) => window.aperture[w].frames(), which);
}

async function frame(name, which = 'flame') {
  const all = await frames(which);
  const f = all.find((x) => x.name === name);
  assert(f, `no frame named ${name} drawn in the ${which} graph; drawn: ${all.map((x) => x.name).join(', ')}`);
  return f;
}

/** Page coordinates of a point inside a frame. */
async function pointIn(f, which = 'flame') {
  const box = await page.locator(graphs[which]).boundingBox();
  return { x: box.x + f.x + Math.min(f.w / 2, 30), y: box.y + f.y + f.h / 2 };
}

async function hover(name, which = 'flame') {
  const p = await pointIn(await frame(name, which), which);
  await page.mouse.move(p.x, p.y);
  await page.waitForSelector('#tooltip:not([hidden])');
  return page.textContent('#tooltip');
}

async function clickFrame(name, which = 'flame') {
  const p = await pointIn(await frame(name, which), which);
  await page.mouse.click(p.x, p.y);
}

/** The canvas pixel at the middle of a frame, [r, g, b]. */
async function pixel(name, which = 'flame') {
  const f = await frame(name, which);
  return page.evaluate(
    ({ sel, x, y }) => {
      const c = document.querySelector(sel);
      const dpr = c.width / c.getBoundingClientRect().width;
      return Array.from(c.getContext('2d').getImageData(Math.round(x * dpr), Math.round(y * dpr), 1, 1).data).slice(0, 3);
    },
    { sel: graphs[which], x: f.x + Math.min(f.w / 2, 30) + 8, y: f.y + 3 },
  );
}

/** Waits until a view finished loading (its state overlay is hidden or shows a result). */
async function settled(view = 'flame') {
  await page.waitForFunction(
    (v) => {
      const s = document.getElementById(`${v}-state`);
      return window.aperture && s && !s.classList.contains('state-loading');
    },
    view,
    { timeout: 15_000 },
  );
  await page.waitForTimeout(50);
}

async function flameLoaded() {
  await settled('flame');
  await page.waitForFunction(() => window.aperture.flame.frames().length > 1, null, { timeout: 15_000 });
}

async function open(query) {
  await page.goto(`${BASE}/${query}`);
  await page.waitForFunction(() => window.aperture);
}

// -------------------------------------------------------------------- run

let browser;
try {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
} catch (e) {
  console.error(`cannot start chromium: ${e.message}`);
  console.log('0 passed, 1 failed');
  process.exit(1);
}
const context = await browser.newContext({ viewport: { width: 1440, height: 900 }, acceptDownloads: true, deviceScaleFactor: 1 });
page = await context.newPage();
const offOrigin = [];
const pageErrors = [];
page.on('request', (r) => {
  const u = r.url();
  if (!u.startsWith(BASE) && !u.startsWith('blob:') && !u.startsWith('data:')) offOrigin.push(u);
});
page.on('pageerror', (e) => pageErrors.push(String(e)));
page.on('console', (m) => {
  // 401s are expected before the token is entered, and 503s from the
  // simulated outage; anything else logged as an error is a bug.
  if (m.type() === 'error' && !/status of (401|503)/.test(m.text())) pageErrors.push(m.text());
});

await test('the token prompt appears when the API answers 401, rejects a wrong token and accepts the right one', async () => {
  await open('');
  await page.waitForSelector('#token-dialog[open]', { timeout: 10_000 });
  assert(await page.isVisible('#token-input'), 'token input not visible');
  await shot('01-token-prompt');
  await page.fill('#token-input', 'not-the-token');
  await page.click('#token-submit');
  await page.waitForSelector('#token-error:not([hidden])', { timeout: 10_000 });
  const err = await page.textContent('#token-error');
  assert(/rejected/i.test(err), `wrong token should be reported as rejected, got: ${err}`);
  assert(await page.evaluate(() => document.getElementById('token-dialog').open), 'dialog closed after a wrong token');
  await shot('02-token-rejected');
  await page.fill('#token-input', TOKEN);
  await page.click('#token-submit');
  await flameLoaded();
  assert(!(await page.evaluate(() => document.getElementById('token-dialog').open)), 'dialog still open');
  const stored = await page.evaluate(() => [sessionStorage.getItem('aperture.token'), localStorage.length]);
  assert(stored[0] === TOKEN && stored[1] === 0, `token must be in sessionStorage only, got ${JSON.stringify(stored)}`);
});

await test('a sign-in link (/#token=...) signs the tab in, and the token leaves the address bar before any request', async () => {
  // A fresh context: no token in session storage yet.
  const ctx = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const p = await ctx.newPage();
  const api = [];
  p.on('request', (r) => {
    if (r.url().includes('/api/v1/')) api.push({ url: r.url(), auth: r.headers().authorization || '' });
  });
  // The address each request was sent from, recorded in the page itself.
  await p.addInitScript(() => {
    const original = window.fetch;
    window.__fetchedFrom = [];
    window.fetch = (...args) => {
      window.__fetchedFrom.push(location.href);
      return original(...args);
    };
  });
  const statuses = [];
  p.on('response', (r) => {
    if (r.url().includes('/api/v1/')) statuses.push(r.status());
  });
  try {
    await p.goto(`${BASE}/?range=1h#token=${encodeURIComponent(TOKEN)}`);
    await p.waitForFunction(() => window.aperture);
    await p.waitForFunction(() => window.aperture.flame.frames().length > 1, null, { timeout: 15_000 });
    assert(!(await p.evaluate(() => document.getElementById('token-dialog').open)), 'the token prompt opened although the link carried the token');
    const where = await p.evaluate(() => [location.hash, location.href, history.length, sessionStorage.getItem('aperture.token')]);
    assert(where[0] === '' && !where[1].includes('token'), `the fragment is still in the address bar: ${where[1]}`);
    assert(where[1].includes('range=1h'), `the view state in the query string was lost: ${where[1]}`);
    assert(where[3] === TOKEN, `the token is not in session storage: ${where[3]}`);
    assert(api.length > 0, 'no API requests were made');
    for (const r of api) {
      assert(r.auth === `Bearer ${TOKEN}`, `an API request went out without the token: ${r.url}`);
      assert(!r.url.includes(TOKEN), `the token reached a request URL: ${r.url}`);
    }
    const from = await p.evaluate(() => window.__fetchedFrom);
    assert(from.length > 0 && from.every((u) => !u.includes('token')), `a request was sent while the token was in the address bar: ${from.join(', ')}`);
    assert(statuses.length > 0 && statuses.every((s) => s === 200), `API answers: ${statuses.join(', ')}`);
    // Back/forward cannot bring the token back: the entry itself was replaced.
    await p.reload();
    await p.waitForFunction(() => window.aperture);
    assert(!(await p.evaluate(() => location.href)).includes('token'), 'the token came back on reload');
  } finally {
    await ctx.close();
  }
});

await test('the flame graph shows the known frames with their shares and units', async () => {
  await open('');
  await flameLoaded();
  const names = (await frames()).map((f) => f.name);
  for (const n of ['all', 'main', 'worker_loop', 'handle_request', 'compute_checksum', 'crc32_update', 'query_loop', 'btree_search', 'vfs_write']) {
    assert(names.includes(n), `frame ${n} missing; drawn: ${names.join(', ')}`);
  }
  assert((await frame('vfs_write')).kernel && !(await frame('compute_checksum')).kernel, 'kernel frames should be flagged');
  const summary = await page.textContent('#flame-summary');
  assert(summary.includes('1,000 samples') && summary.includes('10.0 s of CPU time'), `summary: ${summary}`);
  const tip = await hover('compute_checksum');
  assert(tip.includes('75.0%'), `compute_checksum should be 75.0% of total: ${tip}`);
  assert(tip.includes('750 samples') && tip.includes('7.50 s CPU'), `samples and CPU time: ${tip}`);
  assert(tip.includes('88.2%') && tip.includes('of handle_request'), `% of parent (750 of 850): ${tip}`);
  assert(/user frame/.test(tip), `frame kind: ${tip}`);
  const root = await frame('all');
  const checksum = await frame('compute_checksum');
  near(checksum.w / root.w, 0.75, 0.01, 'width share of compute_checksum');
  await shot('03-flame-cpu');
  const ktip = await hover('vfs_write');
  assert(/kernel frame/.test(ktip) && ktip.includes('5.0%'), `kernel frame tooltip: ${ktip}`);
  const [ur, , ub] = await pixel('compute_checksum');
  const [kr, , kb] = await pixel('vfs_write');
  assert(ur > ub + 60, `user CPU frames should be warm, got rgb(${ur}, ·, ${ub})`);
  assert(kb > kr + 30, `kernel frames should be cool, got rgb(${kr}, ·, ${kb})`);
});

await test('clicking a frame zooms into it; the crumbs and reset zoom out', async () => {
  await page.mouse.move(5, 5);
  const root = await frame('all');
  await clickFrame('handle_request');
  await page.waitForFunction(() => window.aperture.flame.frames().some((f) => f.focus && f.name === 'handle_request'));
  const hr = await frame('handle_request');
  near(hr.w, root.w, 1, 'zoomed frame width');
  near((await frame('compute_checksum')).w / hr.w, 750 / 850, 0.01, 'child share after zoom');
  assert(!(await frames()).some((f) => f.name === 'btree_search'), 'frames outside the zoomed one should be gone');
  assert(page.url().includes('focus=main%3Bworker_loop%3Bhandle_request'), `URL should carry the zoom: ${page.url()}`);
  const crumbs = await page.textContent('#flame-crumbs');
  assert(crumbs.includes('handle_request') && crumbs.includes('85.0% of total'), `crumbs: ${crumbs}`);
  await shot('04-zoomed');
  await page.click('#reset-zoom');
  await page.waitForFunction(() => window.aperture.flame.frames().some((f) => f.focus && f.name === 'all'));
  assert((await frames()).some((f) => f.name === 'btree_search'), 'reset should show everything again');
  assert(!page.url().includes('focus='), 'reset should clear the zoom from the URL');
});

await test('search highlights the matching frames and shows their share', async () => {
  await page.fill('#search', 'crc32');
  await page.waitForSelector('#search-share:not([hidden])');
  const share = await page.textContent('#search-share');
  assert(share.includes('60.0% of total'), `crc32 frames hold 600 of 1000 samples: ${share}`);
  const fs = await frames();
  const matched = fs.filter((f) => f.matched).map((f) => f.name).sort();
  assert(JSON.stringify(matched) === '["crc32_fold","crc32_update"]', `matched: ${matched}`);
  const [r, g, b] = await pixel('btree_search');
  assert(Math.abs(r - b) < 20 && Math.abs(r - g) < 20, `non-matching frames should be greyed, got rgb(${r}, ${g}, ${b})`);
  const [mr, , mb] = await pixel('crc32_update');
  assert(mr > mb + 60, `matching frames keep their colour, got rgb(${mr}, ·, ${mb})`);
  await shot('05-search');
  await page.fill('#search', 'compute_checksum');
  await page.waitForFunction(() => document.getElementById('search-share').textContent.includes('75.0%'));
  await page.fill('#search', 'no_such_function');
  await page.waitForFunction(() => document.getElementById('search-share').textContent.includes('No frame matches'));
  await page.fill('#search', '');
  await page.waitForSelector('#search-share', { state: 'hidden' });
});

await test('the top functions table sorts by self and total and finds a row in the flame graph', async () => {
  await page.waitForSelector('#top-table tbody tr');
  const firstCell = () => page.textContent('#top-table tbody tr:first-child td:first-child');
  assert((await firstCell()) === 'crc32_update', `largest self: ${await firstCell()}`);
  await page.click('#top-table th:nth-child(3) button');
  await page.waitForFunction(() => document.querySelector('#top-table tbody tr td').textContent === 'main');
  assert(page.url().includes('sort=total'), 'sort should be in the URL');
  await page.click('#top-table th:nth-child(3) button');
  const last = await page.textContent('#top-table tbody tr:first-child td:first-child');
  assert(last !== 'main', 'clicking again should reverse the order');
  await page.click('#top-table th:nth-child(2) button');
  await page.waitForFunction(() => document.querySelector('#top-table tbody tr td').textContent === 'crc32_update');
  await page.click('#top-table tbody tr:has-text("btree_search")');
  await page.waitForFunction(() => document.getElementById('search').value === 'btree_search');
  const share = await page.textContent('#search-share');
  assert(share.includes('8.0% of total'), `btree_search is 80 of 1000: ${share}`);
  assert((await frame('btree_search')).matched, 'the clicked function should be highlighted');
  await shot('06-top-functions');
  await page.fill('#search', '');
});

await test('switching the mode to lock and syscall changes the data and the units', async () => {
  await page.click('[data-mode="lock"]');
  await flameLoaded();
  let names = (await frames()).map((f) => f.name);
  assert(names.includes('cache_lookup') && !names.includes('compute_checksum'), `lock frames: ${names}`);
  const summary = await page.textContent('#flame-summary');
  assert(summary.includes('40.0 ms') && summary.includes('wait time') && summary.includes('50 waits'), `lock summary: ${summary}`);
  const tip = await hover('cache_lookup');
  assert(tip.includes('75.0%') && tip.includes('30.0 ms') && tip.includes('40 waits'), `cache_lookup: ${tip}`);
  assert(page.url().includes('mode=lock'), 'mode in URL');
  await shot('07-flame-lock');
  await page.mouse.move(5, 5);
  await page.click('[data-mode="syscall"]');
  await flameLoaded();
  names = (await frames()).map((f) => f.name);
  assert(names.includes('fsync_wal') && names.includes('read_body'), `syscall frames: ${names}`);
  const stip = await hover('fsync_wal');
  assert(stip.includes('75.0%') && stip.includes('150 ms') && stip.includes('15 calls'), `fsync_wal: ${stip}`);
  await shot('08-flame-syscall');
  await page.mouse.move(5, 5);
  await page.click('[data-mode="cpu"]');
  await flameLoaded();
});

await test('filters are fed by the label values and change the data', async () => {
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#filter-process option')).some((o) => o.value === 'db'));
  const options = await page.$$eval('#filter-node option', (os) => os.map((o) => o.value));
  assert(JSON.stringify(options) === '["","node-a","node-b"]', `node values: ${options}`);
  await page.selectOption('#filter-process', 'db');
  await flameLoaded();
  await page.waitForFunction(() => !window.aperture.flame.frames().some((f) => f.name === 'compute_checksum'));
  const summary = await page.textContent('#flame-summary');
  assert(summary.includes('100 samples') && summary.includes('process = db'), `db summary: ${summary}`);
  const tip = await hover('btree_search');
  assert(tip.includes('80.0%'), `btree_search is 80% of db: ${tip}`);
  assert(page.url().includes('process=db'), 'filter in URL');
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#filter-node option')).map((o) => o.value).join() === ',node-b');
  await shot('09-filter-process-db');
  await page.mouse.move(5, 5);
});

await test('the URL carries the state: a reload restores filter, mode, search and zoom', async () => {
  await page.fill('#search', 'btree');
  await clickFrame('query_loop');
  await page.waitForFunction(() => location.search.includes('focus='));
  await page.reload();
  await flameLoaded();
  assert((await page.inputValue('#filter-process')) === 'db', 'process filter restored');
  assert((await page.inputValue('#search')) === 'btree', 'search restored');
  assert((await frame('query_loop')).focus, 'zoom restored');
  assert((await page.textContent('#search-share')).includes('80.0% of total'), 'search share restored');
  await page.click('#clear-filters');
  await flameLoaded();
  await page.waitForFunction(() => window.aperture.flame.frames().some((f) => f.name === 'compute_checksum'));
  assert(!page.url().includes('process='), 'clearing filters updates the URL');
  await page.goBack();
  await flameLoaded();
  assert((await page.inputValue('#filter-process')) === 'db', 'back restores the previous state');
  await open('');
  await flameLoaded();
});

await test('time range presets and a custom range reload the data and go into the URL', async () => {
  await page.click('#presets [data-range="1h"]');
  await flameLoaded();
  assert(page.url().includes('range=1h'), `preset in URL: ${page.url()}`);
  assert((await page.textContent('#flame-summary')).includes('1,700 samples'), 'the last hour holds both data sets (700 + 1,000)');
  await page.click('#presets [data-range="custom"]');
  await page.waitForSelector('#custom-range:not([hidden])');
  const pad = (n) => String(n).padStart(2, '0');
  const local = (d) => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
  const now = Date.now();
  await page.fill('#custom-from', local(new Date(now - 30 * 60_000)));
  await page.fill('#custom-to', local(new Date(now - 10 * 60_000)));
  await page.click('#custom-apply');
  await flameLoaded();
  assert(/range=custom&from=\d+&to=\d+/.test(page.url()), `custom range in URL: ${page.url()}`);
  assert((await page.textContent('#flame-summary')).includes('700 samples'), 'only the older data set lies 30 to 10 minutes ago');
  await shot('09b-custom-range');
  await page.click('#presets [data-range="15m"]');
  await flameLoaded();
  assert(await page.isHidden('#custom-range'), 'a preset hides the custom inputs');
});

await test('the syscall table lists counts, errors, percentiles and total time', async () => {
  await page.click('[data-view="syscalls"]');
  await settled('syscalls');
  await page.waitForSelector('#syscalls-table tbody tr');
  const headers = await page.$$eval('#syscalls-table th', (ts) => ts.map((t) => t.textContent.replace(/[▲▼]/g, '').trim()));
  assert(JSON.stringify(headers) === '["Syscall","Calls","Errors","Error rate","p50","p90","p99","Total time"]', `headers: ${headers}`);
  const rows = await page.$$eval('#syscalls-table tbody tr', (trs) => trs.map((tr) => Array.from(tr.cells).map((c) => c.textContent.trim())));
  assert(rows.length === 6, `6 syscalls expected, got ${rows.length}`);
  const read = rows.find((r) => r[0] === 'read');
  assert(read && read[1] === '5,000' && read[2] === '3', `read row: ${read}`);
  assert(read[4].endsWith('µs') && read[7].endsWith('ms'), `read latency and total: ${read}`);
  assert(rows[0][0] === 'epoll_wait', `sorted by total time: ${rows.map((r) => r[0])}`);
  await page.click('#syscalls-table th:nth-child(2) button');
  const first = await page.textContent('#syscalls-table tbody tr:first-child td:first-child');
  assert(first === 'read', `sorted by calls: ${first}`);
  await shot('10-syscalls');
});

await test('the lock table lists call sites with waits and wait time, linked to the flame graph', async () => {
  await page.click('[data-view="locks"]');
  await settled('locks');
  await page.waitForSelector('#locks-table tbody tr');
  const rows = await page.$$eval('#locks-table tbody tr', (trs) => trs.map((tr) => Array.from(tr.cells).map((c) => c.textContent.trim())));
  assert(rows.length === 3, `3 call sites expected: ${rows.length}`);
  assert(rows[0][0].startsWith('cache_lookup') && rows[0][2] === '40' && rows[0][3] === '30.0 ms', `top site: ${rows[0]}`);
  assert(rows.some((r) => r[1] === 'kernel mutex'), `a kernel lock row: ${rows.map((r) => r[1])}`);
  await shot('11-locks');
  await page.click('#locks-table tbody tr:first-child');
  await flameLoaded();
  assert(page.url().includes('mode=lock') && (await page.inputValue('#search')) === 'cache_lookup', `link to flame: ${page.url()}`);
  assert((await frame('cache_lookup')).matched, 'call site highlighted');
});

await test('lock views show contention by default and idle waiting one click away', async () => {
  await open('?view=locks');
  await settled('locks');
  await page.waitForSelector('#locks-table tbody tr');
  const pressed = () => page.$eval('[data-lock-class][aria-pressed="true"]', (b) => b.dataset.lockClass);
  assert((await pressed()) === 'contention', 'contention is the default');
  const sites = () => page.$$eval('#locks-table tbody tr', (trs) => trs.map((tr) => `${tr.cells[0].textContent.trim()}|${tr.cells[1].textContent.trim()}`));
  assert(!(await sites()).some((r) => r.startsWith('pool_idle')), `idle waits hidden: ${await sites()}`);
  await page.click('[data-lock-class="all"]');
  await settled('locks');
  await page.waitForFunction(() => document.querySelectorAll('#locks-table tbody tr').length === 4);
  const all = await sites();
  assert(all[0].startsWith('pool_idle') && all[0].endsWith('|condition variable'), `idle condvar wait first (200 ms): ${all}`);
  assert(page.url().includes('lock_class=all'), `class in URL: ${page.url()}`);
  await shot('11b-locks-all');
  // The flame graph of lock waits follows the same choice.
  await page.click('[data-view="flame"]');
  await page.click('[data-mode="lock"]');
  await flameLoaded();
  const drawn = (present) => page.waitForFunction((p) => window.aperture.flame.frames().some((f) => f.name === 'pool_idle') === p, present, { timeout: 15_000 });
  await drawn(true);
  await page.click('[data-lock-class="contention"]');
  await drawn(false);
  assert((await frame('cache_lookup')).name === 'cache_lookup', 'contention still drawn');
  assert(!page.url().includes('lock_class'), `the default stays out of the URL: ${page.url()}`);
});

await test('the diff view colours a known regression red and an improvement blue', async () => {
  await open('?view=diff');
  await settled('diff');
  await page.waitForFunction(() => window.aperture.diff.frames().length > 1);
  const up = await frame('crc32_update', 'diff');
  const down = await frame('json_decode', 'diff');
  assert(/^hsl\(0,/.test(up.fill), `crc32_update grew (28.6% -> 60.0%) and should be red: ${up.fill}`);
  assert(/^hsl\(213,/.test(down.fill), `json_decode shrank (35.7% -> 6.0%) and should be blue: ${down.fill}`);
  const [r, , b] = await pixel('crc32_update', 'diff');
  assert(r > b + 60, `red pixel expected, got rgb(${r}, ·, ${b})`);
  const [r2, , b2] = await pixel('json_decode', 'diff');
  assert(b2 > r2 + 40, `blue pixel expected, got rgb(${r2}, ·, ${b2})`);
  const same = await frame('btree_search', 'diff');
  assert(/^hsl\(213,/.test(same.fill) || same.fill.startsWith('hsl(220'), `btree_search's share fell slightly: ${same.fill}`);
  const summary = await page.textContent('#diff-summary');
  assert(summary.includes('700 samples') && summary.includes('1,000 samples'), `diff summary: ${summary}`);
  const tip = await hover('crc32_update', 'diff');
  assert(/grew/.test(tip) && tip.includes('28.6%') && tip.includes('60.0%') && tip.includes('+31.4 pp'), `tooltip: ${tip}`);
  const firstChange = await page.textContent('#diff-table tbody tr:first-child');
  assert(firstChange.includes('json_decode') || firstChange.includes('crc32_update'), `largest change: ${firstChange}`);
  await shot('12-diff');
  await page.mouse.move(5, 5);
  await page.selectOption('#diff-base', '1d');
  await settled('diff');
  await page.waitForFunction(() => document.getElementById('diff-summary').textContent.includes('base range has no data'));
  assert(page.url().includes('base=1d'), 'base in URL');
  assert(/^hsl\(0,/.test((await frame('btree_search', 'diff')).fill), 'with an empty base everything is new (red)');
  await shot('13-diff-empty-base');
  await open(`?view=diff&range=custom&from=${Math.floor(Date.now() / 1000) - 40 * 86400}&to=${Math.floor(Date.now() / 1000) - 39 * 86400}`);
  await settled('diff');
  await page.waitForSelector('#diff-state.state-empty');
  const text = await page.textContent('#diff-state');
  assert(/nothing in/.test(text), `two empty ranges should say so: ${text}`);
});

await test('download buttons save pprof, folded and SVG with the token', async () => {
  await open('?process=api');
  await flameLoaded();
  const save = async (format) => {
    const [d] = await Promise.all([page.waitForEvent('download', { timeout: 15_000 }), page.click(`[data-download="${format}"]`)]);
    return { name: d.suggestedFilename(), body: readFileSync(await d.path()) };
  };
  const folded = await save('folded');
  const text = folded.body.toString('utf8');
  assert(text.includes('main;worker_loop;handle_request;compute_checksum;crc32_update 520'), `folded: ${text.slice(0, 200)}`);
  assert(!text.includes('btree_search'), 'downloads follow the filters');
  assert(folded.name.endsWith('.folded.txt'), `name: ${folded.name}`);
  const svg = await save('svg');
  assert(svg.body.toString('utf8').includes('<svg') && svg.name.endsWith('.svg'), 'svg download');
  const pprof = await save('pprof');
  assert(pprof.body[0] === 0x1f && pprof.body[1] === 0x8b && pprof.name.endsWith('.pb.gz'), 'pprof is gzip');
});

await test('empty states say what is missing and where', async () => {
  const now = Math.floor(Date.now() / 1000);
  await open(`?range=custom&from=${now - 40 * 86400}&to=${now - 39 * 86400}`);
  await settled('flame');
  const t1 = await page.textContent('#flame-state');
  assert(/No samples between/.test(t1), `custom empty range: ${t1}`);
  await open('?mode=lock&range=5m&process=db&node=node-a');
  await settled('flame');
  const t2 = await page.textContent('#flame-state');
  assert(t2.includes('No lock waits for these filters in the last 5 minutes') && t2.includes('Clear filters'), `filtered: ${t2}`);
  await shot('14-empty');
  await page.click('#flame-state button:has-text("Clear filters")');
  await flameLoaded();
  assert((await frames()).some((f) => f.name === 'cache_lookup'), 'clearing filters from the empty state shows data');
});

await test('loading and error states show what the aggregator said, and retry recovers', async () => {
  let fail = true;
  await page.route('**/api/v1/flamegraph*', async (route) => {
    if (!fail) return route.continue();
    await new Promise((r) => setTimeout(r, 400));
    return route.fulfill({ status: 503, contentType: 'application/json', body: '{"error":"store unreachable: connection refused (simulated)"}' });
  });
  await open('');
  await page.waitForSelector('#flame-state.state-loading', { timeout: 5_000 });
  const loading = await page.textContent('#flame-state');
  assert(/Loading CPU samples in the last 15 minutes/.test(loading), `loading: ${loading}`);
  await page.waitForSelector('#flame-state.state-error');
  const text = await page.textContent('#flame-state');
  assert(text.includes('cannot answer right now') && text.includes('store unreachable'), `error: ${text}`);
  await shot('15-error');
  fail = false;
  await page.click('#flame-state button:has-text("Retry")');
  await flameLoaded();
  await page.unroute('**/api/v1/flamegraph*');
});

await test('a large tree (20 000 frames) draws and stays interactive', async () => {
  const r = await page.evaluate(async () => {
    const { prepare } = await import('/ui/tree.js');
    let seed = 7;
    const rand = () => ((seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648);
    let made = 0;
    const grow = (depth) => {
      const n = { name: `fn_${made++}_${depth}`, children: [], self: 0, value: 0, count: 0, ns: 0 };
      const kids = depth < 14 ? Math.floor(rand() * 4) + (depth < 4 ? 2 : 0) : 0;
      for (let i = 0; i < kids && made < 20000; i++) n.children.push(grow(depth + 1));
      n.self = 1 + Math.floor(rand() * 50);
      n.value = n.self + n.children.reduce((a, c) => a + c.value, 0);
      n.count = n.value;
      n.ns = n.value * 1e7;
      return n;
    };
    const root = { name: 'root', children: [], self: 0 };
    while (made < 20000) root.children.push(grow(1));
    root.value = root.children.reduce((a, c) => a + c.value, 0);
    const data = prepare(root);
    const g = window.aperture.flame;
    const t0 = performance.now();
    g.setData(data, { palette: 'cpu' });
    const first = performance.now() - t0;
    const t1 = performance.now();
    g.setSearch('fn_1');
    const search = performance.now() - t1;
    return { nodes: data.nodes, drawn: g.frames().length, first, search };
  });
  console.log(`     ${r.nodes} nodes, ${r.drawn} drawn; first draw ${r.first.toFixed(1)} ms, search ${r.search.toFixed(1)} ms`);
  assert(r.nodes >= 20000 && r.drawn > 1000, `drew ${r.drawn} of ${r.nodes}`);
  const box = await page.locator(graphs.flame).boundingBox();
  await page.mouse.move(box.x + box.width / 3, box.y + 30);
  await page.waitForSelector('#tooltip:not([hidden])');
  await shot('16-large-tree');
  await page.mouse.move(5, 5);
});

await test('the type picker lists pushed profile types and the service filter narrows to a service', async () => {
  const heap = 'memory:alloc_space:bytes:space:bytes';
  await open('');
  await page.waitForFunction((id) => Array.from(document.querySelectorAll('#type-select option')).some((o) => o.value === id), heap, { timeout: 15_000 });
  const listed = await page.$$eval('#type-select option', (os) => os.map((o) => o.value));
  assert(JSON.stringify(listed) === JSON.stringify(['', heap]), `the picker lists the pushed types only: ${listed}`);
  await page.selectOption('#type-select', heap);
  await flameLoaded();
  const names = (await frames()).map((f) => f.name);
  assert(names.includes('parse_json') && !names.includes('compute_checksum'), `heap frames: ${names}`);
  assert(page.url().includes(`type=${encodeURIComponent(heap)}`) || page.url().includes(`type=${heap}`), `type in URL: ${page.url()}`);
  assert((await page.getAttribute('[data-mode="cpu"]', 'aria-pressed')) === 'false', 'a mode still shows as chosen');
  const summary = await page.textContent('#flame-summary');
  assert(summary.includes('4.0 KiB') && summary.includes('alloc_space'), `heap summary: ${summary}`);
  const tip = await hover('parse_json');
  assert(tip.includes('75.0%') && tip.includes('3.0 KiB'), `parse_json: ${tip}`);
  await page.mouse.move(5, 5);
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#filter-service option')).map((o) => o.value).join() === ',checkout');
  await page.selectOption('#filter-service', 'checkout');
  await flameLoaded();
  assert(page.url().includes('service=checkout'), `service in URL: ${page.url()}`);
  const filtered = await page.textContent('#flame-summary');
  assert(filtered.includes('4.0 KiB') && filtered.includes('service = checkout'), `checkout summary: ${filtered}`);
  await shot('17-pushed-type-service');
  await page.reload();
  await page.waitForFunction(() => window.aperture);
  await flameLoaded();
  assert((await page.inputValue('#type-select')) === heap && (await page.inputValue('#filter-service')) === 'checkout', 'a reload lost the type or the service');
  // A mode button goes back to the agent's profiles; the agent's rows have no service.
  await page.click('#clear-filters');
  await flameLoaded();
  await page.click('[data-mode="cpu"]');
  await flameLoaded();
  assert(!page.url().includes('type='), `type still in URL: ${page.url()}`);
  assert((await page.inputValue('#type-select')) === '', 'the picker still shows the pushed type');
  const cpu = (await frames()).map((f) => f.name);
  assert(cpu.includes('compute_checksum') && !cpu.includes('parse_json'), `cpu frames: ${cpu}`);
});

await test('the tag filter lists the tag keys, then the values of one, and narrows to it', async () => {
  const heap = 'memory:alloc_space:bytes:space:bytes';
  await open(`?type=${encodeURIComponent(heap)}`);
  await flameLoaded();
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#filter-tag-key option')).map((o) => o.value).join() === ',env');
  assert(await page.isDisabled('#filter-tag-value'), 'values are offered before a key is chosen');
  await page.selectOption('#filter-tag-key', 'env');
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#filter-tag-value option')).map((o) => o.value).join() === ',prod');
  await page.selectOption('#filter-tag-value', 'prod');
  await flameLoaded();
  assert(page.url().includes('tag_key=env') && page.url().includes('tag_value=prod'), `tag in URL: ${page.url()}`);
  const summary = await page.textContent('#flame-summary');
  assert(summary.includes('4.0 KiB') && summary.includes('env = prod'), `tagged summary: ${summary}`);
  await shot('18-tag-filter');
  // Another value selects nothing; clearing the filters clears the tag too.
  await open(`?type=${encodeURIComponent(heap)}&tag_key=env&tag_value=dev`);
  await settled('flame');
  const empty = await page.textContent('#flame-state');
  assert(empty.includes('Clear filters'), `tag=dev: ${empty}`);
  await page.click('#flame-state button:has-text("Clear filters")');
  await flameLoaded();
  assert(!page.url().includes('tag_'), `the tag stayed in the URL: ${page.url()}`);
  assert((await frames()).some((f) => f.name === 'parse_json'), 'clearing the tag filter shows the data');
});

await test('the page loads nothing from other origins and logs no errors', async () => {
  assert(offOrigin.length === 0, `requests to other origins: ${offOrigin.join(', ')}`);
  assert(pageErrors.length === 0, `page errors: ${pageErrors.join(' | ')}`);
  const r = await page.request.get(`${BASE}/`);
  const csp = r.headers()['content-security-policy'] || '';
  assert(csp.includes("default-src 'none'") && csp.includes("script-src 'self'") && !/https?:/.test(csp), `CSP: ${csp}`);
});

await browser.close();
console.log(`screenshots in ${ARTIFACTS}`);
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
