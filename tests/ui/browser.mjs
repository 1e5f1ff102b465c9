// Drives Debian's chromium (never a downloaded browser) over zt's map page for
// tests/tests/e2e_ui.rs: reads what the page drew (cytoscape's nodes and edges, the
// panels), clicks a workload, marks it compromised, reads the drawing again and saves a
// screenshot. Prints one JSON object; the Rust test makes the assertions.
// Usage: node browser.mjs <url> <screenshot.png> <spiffe id to mark>
import { chromium } from 'playwright-core';

const [url, shot, target] = process.argv.slice(2);
if (!url || !shot || !target) {
  console.error('usage: node browser.mjs <url> <screenshot.png> <spiffe id>');
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const errors = [];
try {
  const page = await browser.newPage({ viewport: { width: 1500, height: 900 } });
  page.on('pageerror', (e) => errors.push('pageerror: ' + e.message));
  page.on('console', (m) => { if (m.type() === 'error') errors.push('console: ' + m.text()); });
  page.on('response', (r) => { if (r.status() >= 400) errors.push('HTTP ' + r.status() + ' ' + r.url()); });
  const withoutToken = (await page.request.get(new URL('/api/graph', url).href)).status();
  await page.goto(url);
  await page.waitForFunction(() => Number(document.body.dataset.loaded || 0) >= 1, null, { timeout: 20000 });
  const drawn = () => page.evaluate(() => ({
    nodes: window.cy.nodes().map((n) => ({ id: n.id(), identity: n.data('identity'), spiffe: n.data('spiffe'), label: n.data('label'), parent: n.data('parent') || null,
      isParent: n.isParent(), colour: n.data('colour'), risk: n.data('risk'), fill: n.style('background-color'), classes: n.classes() })),
    edges: window.cy.edges().map((e) => ({ id: e.id(), src: e.source().data('spiffe'), dst: e.target().data('spiffe'), kind: e.data('kind'), ports: e.data('ports'),
      rules: e.data('rules'), lineStyle: e.style('line-style'), lineColour: e.style('line-color'), classes: e.classes() })),
    top5: document.getElementById('top5').innerText,
    incidents: document.getElementById('incidents').innerText,
    posture: document.getElementById('posture').innerText,
    status: document.getElementById('status').innerText,
  }));
  const before = await drawn();
  // Filters: hiding denied edges, then a name search, redraws without them.
  await page.uncheck('#show-denied');
  const deniedHidden = await page.evaluate(() => window.cy.edges('.denied').length);
  await page.check('#show-denied');
  await page.fill('#find', 'notsleep');
  const found = await page.evaluate(() => window.cy.nodes().filter((n) => !n.isParent()).map((n) => n.data('spiffe')));
  await page.fill('#find', '');
  // Click the workload where cytoscape drew it, as a person would.
  const at = await page.evaluate((spiffe) => {
    const n = window.cy.nodes().filter((x) => x.data('spiffe') === spiffe)[0];
    if (!n) return null;
    const p = n.renderedPosition();
    const box = window.cy.container().getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  }, target);
  if (!at) throw new Error('no node ' + target + ' drawn');
  await page.mouse.click(at.x, at.y);
  await page.waitForSelector('#mark', { timeout: 5000 });
  const selected = await page.locator('#details').innerText();
  const loads = await page.evaluate(() => Number(document.body.dataset.loaded));
  await page.click('#mark');
  await page.waitForFunction((n) => Number(document.body.dataset.loaded) > n, loads, { timeout: 10000 });
  await page.waitForFunction(() => window.cy.nodes('.compromised').length > 0, null, { timeout: 10000 });
  const after = await drawn();
  const detailsAfter = await page.locator('#details').innerText();
  await page.screenshot({ path: shot });
  console.log(JSON.stringify({ before, after, selected, detailsAfter, errors, withoutToken, deniedHidden, found }));
} finally {
  await browser.close();
}
