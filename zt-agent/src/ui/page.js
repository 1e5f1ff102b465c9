// zt map page: draws what /api/graph computed (risk, paths, blast radius are the
// agent's; nothing is computed here but the drawing). Text from the cluster is always
// set as textContent, never as HTML.
'use strict';

const token = new URLSearchParams(location.search).get('token');
const headers = token ? { Authorization: 'Bearer ' + token } : {};
const $ = (id) => document.getElementById(id);
const COLOURS = { green: '#43a047', yellow: '#f9a825', red: '#e53935' };
let data = null;
let selected = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

const cy = cytoscape({
  container: $('cy'),
  wheelSensitivity: 0.3,
  style: [
    { selector: 'node', style: { label: 'data(label)', 'text-wrap': 'wrap', 'font-size': 10, 'text-valign': 'bottom', 'text-margin-y': 4,
      'background-color': 'data(fill)', width: 30, height: 30, 'border-width': 1, 'border-color': '#555' } },
    { selector: 'node.compromised', style: { 'border-width': 5, 'border-color': '#000', shape: 'octagon' } },
    { selector: 'node.reserved', style: { shape: 'round-rectangle' } },
    { selector: ':parent', style: { 'background-color': '#e8ecf3', 'background-opacity': 0.6, 'border-color': '#9aa4b5', 'border-width': 1,
      label: 'data(label)', 'text-valign': 'top', 'font-size': 12, 'font-weight': 'bold', shape: 'round-rectangle', padding: 18 } },
    { selector: 'edge', style: { width: 2, 'curve-style': 'bezier', 'control-point-step-size': 45, 'target-arrow-shape': 'triangle', 'line-color': '#607d8b', 'target-arrow-color': '#607d8b',
      label: 'data(label)', 'font-size': 8, 'text-rotation': 'autorotate', 'text-background-color': '#fff', 'text-background-opacity': 0.8 } },
    { selector: 'edge.permitted', style: { 'line-style': 'dashed', 'line-color': '#90a4ae', 'target-arrow-color': '#90a4ae' } },
    { selector: 'edge.used', style: { 'line-style': 'solid', 'line-color': '#37474f', 'target-arrow-color': '#37474f', width: 3 } },
    { selector: 'edge.denied', style: { 'line-style': 'solid', 'line-color': '#e53935', 'target-arrow-color': '#e53935', 'target-arrow-shape': 'tee' } },
    { selector: 'edge.risk-path', style: { 'line-color': '#ff6f00', 'target-arrow-color': '#ff6f00', width: 5 } },
    { selector: ':selected', style: { 'overlay-color': '#1565c0', 'overlay-opacity': 0.25 } },
  ],
});

function nodeLabel(n) {
  const short = n.namespace ? n.name : n.spiffe_id;
  return n.risk.value > 0 ? short + '\nrisk ' + n.risk.value.toFixed(2) : short;
}

function visible(n) {
  const ns = $('ns').value;
  const reserved = !n.namespace;
  if (reserved && !$('show-reserved').checked) return false;
  if (ns && !reserved && n.namespace !== ns) return false;
  const f = $('find').value.trim().toLowerCase();
  if (f && !(n.spiffe_id.toLowerCase().includes(f) || n.name.toLowerCase().includes(f))) return false;
  return true;
}

function elements(d) {
  const byId = new Map(d.identities.map((n) => [n.id, n]));
  // Reserved identities (world, host, ...) only when an edge names them.
  const linked = new Set();
  for (const e of d.permitted.concat(d.observed)) { linked.add(e.src); linked.add(e.dst); }
  const shown = new Set(d.identities.filter((n) => visible(n) && (n.namespace || linked.has(n.id))).map((n) => n.id));
  const els = [];
  const namespaces = new Set();
  for (const n of d.identities) {
    if (!shown.has(n.id)) continue;
    if (n.namespace) namespaces.add(n.namespace);
    els.push({ group: 'nodes', data: { id: 'i' + n.id, identity: n.id, label: nodeLabel(n), fill: COLOURS[n.risk.colour],
      colour: n.risk.colour, risk: n.risk.value, spiffe: n.spiffe_id, parent: n.namespace ? 'ns:' + n.namespace : undefined },
      classes: (n.compromised ? 'compromised ' : '') + (n.namespace ? '' : 'reserved') });
  }
  for (const ns of namespaces) els.push({ group: 'nodes', data: { id: 'ns:' + ns, label: ns, namespace: true } });
  // Edges on the path that gave some node its risk.
  const riskPairs = new Set();
  for (const n of d.identities) for (let i = 1; i < n.risk.path.length; i++) riskPairs.add(n.risk.path[i - 1] + '>' + n.risk.path[i]);
  const both = (e) => shown.has(e.src) && shown.has(e.dst);
  const name = (id) => (byId.get(id) || { spiffe_id: 'identity ' + id }).spiffe_id;
  d.permitted.forEach((e, i) => {
    if (!both(e) || (!e.used && !$('show-permitted').checked)) return;
    els.push({ group: 'edges', data: { id: 'p' + i, source: 'i' + e.src, target: 'i' + e.dst, kind: e.used ? 'used' : 'permitted', label: e.ports,
      ports: e.ports, rules: e.rules, src: name(e.src), dst: name(e.dst), egress: e.egress, ingress: e.ingress },
      classes: (e.used ? 'used' : 'permitted') + (riskPairs.has(e.src + '>' + e.dst) ? ' risk-path' : '') });
  });
  d.observed.forEach((e, i) => {
    if (!both(e)) return;
    const base = { source: 'i' + e.src, target: 'i' + e.dst, label: e.proto + '/' + e.port, ports: e.proto + '/' + e.port, rules: e.rules,
      src: name(e.src), dst: name(e.dst), counts: e.counts, first_seen: e.first_seen, last_seen: e.last_seen };
    if (e.denied > 0 && $('show-denied').checked) {
      els.push({ group: 'edges', data: Object.assign({ id: 'd' + i, kind: 'denied', count: e.denied }, base), classes: 'denied' });
    }
    // Allowed traffic no permitted edge covers (admitted under an older policy, say).
    const covered = d.permitted.some((p) => p.used && p.src === e.src && p.dst === e.dst);
    if (e.allowed > 0 && !covered) {
      els.push({ group: 'edges', data: Object.assign({ id: 'a' + i, kind: 'used', count: e.allowed }, base), classes: 'used' });
    }
  });
  return els;
}

function li(list, parts) {
  const item = el('li');
  for (const [text, cls] of parts) item.appendChild(el('span', text, cls));
  list.appendChild(item);
}

function panels(d) {
  const byId = new Map(d.identities.map((n) => [n.id, n]));
  const top = $('top5');
  top.replaceChildren();
  for (const id of d.top_risk) {
    const n = byId.get(id);
    li(top, [[n.spiffe_id + ' ', 'mono'], [n.risk.value.toFixed(2) + ' ' + n.risk.colour, n.risk.colour]]);
  }
  if (!d.top_risk.length) top.appendChild(el('li', 'nothing at risk'));
  const inc = $('incidents');
  inc.replaceChildren();
  for (const i of d.incidents) {
    li(inc, [[i.kind + ': ', riskColour(d, i.risk)], [(byId.get(i.identity) || { spiffe_id: i.identity }).spiffe_id + ' ', 'mono'], [i.detail]]);
  }
  if (!d.incidents.length) inc.appendChild(el('li', 'none in the window'));
  const l = d.limits;
  $('limits').textContent = `entries ${l.entries}/${l.max_entries}, dropped ${l.dropped.observations}, evicted ${l.dropped.evicted_entries}, ` +
    `permitted dropped ${l.permitted_dropped}, events lagged ${l.events_lagged}; buckets ${l.buckets}×${l.bucket_seconds}s`;
}

function riskColour(d, v) {
  return v >= d.thresholds.red ? 'red' : v >= d.thresholds.yellow ? 'yellow' : 'green';
}

async function loadPosture() {
  const r = await fetch('api/posture?window=' + $('window').value, { headers });
  const p = $('posture');
  p.replaceChildren();
  if (!r.ok) { p.appendChild(el('li', 'not available: ' + r.status)); return; }
  const x = await r.json();
  const add = (title, rows) => {
    const item = el('li', title + ': ' + (rows.length ? '' : 'none'));
    if (rows.length) { const u = el('ul'); for (const row of rows) u.appendChild(el('li', row, 'mono')); item.appendChild(u); }
    p.appendChild(item);
  };
  add('namespaces without default-deny', x.namespaces_without_default_deny.map((n) => n.namespace + ' (' + n.open.join(', ') + ')'));
  add('pods no policy isolates', x.pods_not_isolated.map((n) => n.pod + ' (' + n.open.join(', ') + ')'));
  add('reachable from world', x.reachable_from_world.map((n) => n.spiffe_id + ' ' + n.detail));
  add('largest blast radius', x.largest_blast_radius.map((n) => n.spiffe_id + ' ' + n.detail));
  add('rules that allowed nothing', x.rules_unused.map((n) => n.name));
}

function showNode(id) {
  const n = data.identities.find((x) => x.id === id);
  const box = $('details');
  box.replaceChildren();
  if (!n) return;
  const byId = new Map(data.identities.map((x) => [x.id, x]));
  box.appendChild(el('div', n.spiffe_id, 'mono'));
  box.appendChild(el('div', 'identity ' + n.id + (n.pods.length ? ' · pods ' + n.pods.join(', ') : '')));
  box.appendChild(el('div', 'isolated: ingress ' + n.isolated_ingress + ', egress ' + n.isolated_egress));
  const r = el('div', 'risk ' + n.risk.value.toFixed(2) + ' (' + n.risk.colour + '), own ' + n.risk.base.toFixed(2), n.risk.colour);
  r.id = 'detail-risk';
  box.appendChild(r);
  if (n.risk.path.length > 1) box.appendChild(el('div', 'because: ' + n.risk.path.map((i) => (byId.get(i) || { name: i }).name).join(' → ')));
  box.appendChild(el('div', 'blast radius: ' + n.blast_radius + ' identities' + (n.reach.length ? ' (' + n.reach.map((i) => (byId.get(i) || { name: i }).name).join(', ') + ')' : '')));
  box.appendChild(el('div', 'deny its egress: cuts ' + n.containment.edges_cut + ' permitted edges (' + n.containment.used_edges_cut + ' in use)'));
  const b = el('button', n.compromised ? 'Clear compromised' : 'Mark compromised');
  b.id = 'mark';
  b.onclick = () => mark(n.id, !n.compromised);
  box.appendChild(b);
}

function showEdge(e) {
  const box = $('details');
  box.replaceChildren();
  const d = e.data();
  box.appendChild(el('div', { used: 'allowed, used', permitted: 'allowed, never used in the window', denied: 'denied attempts' }[d.kind] + ' · ' + d.ports));
  box.appendChild(el('div', 'from ' + d.src, 'mono'));
  box.appendChild(el('div', 'to ' + d.dst, 'mono'));
  if (d.rules && d.rules.length) box.appendChild(el('div', 'rule: ' + d.rules.join('; ')));
  else box.appendChild(el('div', d.kind === 'denied' ? 'rule: none allows it (default deny)' : 'rule: none (a side is not isolated)'));
  if (d.counts) box.appendChild(el('div', Object.entries(d.counts).map(([k, v]) => k + ' ' + v).join(', ')));
  if (d.last_seen) box.appendChild(el('div', 'first ' + new Date(d.first_seen * 1000).toISOString() + ', last ' + new Date(d.last_seen * 1000).toISOString()));
}

async function mark(id, on) {
  const r = await fetch('api/compromised', { method: 'POST', headers: Object.assign({ 'Content-Type': 'application/json', 'X-ZT-Request': '1' }, headers),
    body: JSON.stringify({ identity: id, compromised: on }) });
  if (!r.ok) { $('status').textContent = 'mark failed: ' + r.status; return; }
  await load();
  showNode(id);
}

let laidOut = false;
function draw() {
  const positions = {};
  cy.nodes().forEach((n) => { positions[n.id()] = n.position(); });
  cy.elements().remove();
  cy.add(elements(data));
  const known = cy.nodes().every((n) => n.isParent() || positions[n.id()]);
  if (!laidOut || !known) {
    cy.layout({ name: 'cose', animate: false, randomize: true, nodeDimensionsIncludeLabels: true, nodeRepulsion: () => 400000,
      idealEdgeLength: () => 180, nodeOverlap: 40, componentSpacing: 120, nestingFactor: 1.2, numIter: 2500, padding: 40 }).run();
    laidOut = true;
  } else {
    cy.nodes().forEach((n) => { if (!n.isParent() && positions[n.id()]) n.position(positions[n.id()]); });
  }
  panels(data);
  const ns = $('ns');
  const want = [...new Set(data.identities.map((n) => n.namespace).filter((x) => x))].sort();
  if (ns.options.length - 1 !== want.length) {
    const cur = ns.value;
    ns.replaceChildren(el('option', 'all'));
    ns.options[0].value = '';
    for (const n of want) { const o = el('option', n); o.value = n; ns.appendChild(o); }
    ns.value = cur;
  }
}

async function load() {
  const r = await fetch('api/graph?window=' + $('window').value, { headers });
  if (!r.ok) { $('status').textContent = 'error ' + r.status; return; }
  data = await r.json();
  window.ztGraph = data;
  draw();
  await loadPosture();
  $('status').textContent = 'node ' + data.node + ' · ' + data.identities.length + ' identities · updated ' + new Date(data.generated_at * 1000).toLocaleTimeString();
  document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
}

cy.on('tap', 'node', (ev) => { const id = ev.target.data('identity'); if (id !== undefined) { selected = id; showNode(id); } });
cy.on('tap', 'edge', (ev) => showEdge(ev.target));
for (const id of ['window', 'ns', 'show-permitted', 'show-denied', 'show-reserved']) $(id).addEventListener('change', () => { laidOut = false; id === 'window' ? load() : draw(); });
$('find').addEventListener('input', () => { laidOut = false; draw(); });
window.cy = cy;
load();
setInterval(() => { load().then(() => { if (selected !== null) showNode(selected); }); }, 10000);
