// cxr_jax viewer: plain JavaScript, no framework, no build step, nothing from the network.
'use strict';

const SVG = 'http://www.w3.org/2000/svg';
const state = { info: null, analysis: null, token: 0, selected: null, panels: [] };
const $ = (sel, root = document) => root.querySelector(sel);

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 0.01 || a >= 1000)) return v.toExponential(1);
  return v.toFixed(a < 1 ? 3 : 2);
}

function show(el, on) { el.hidden = !on; }

async function api(url, options = {}) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

// ------------------------------------------------------------------------------- set-up
async function init() {
  try {
    state.info = await api('/api/info');
  } catch (e) {
    $('#served').textContent = `The server did not answer: ${e.message}`;
    return;
  }
  const runs = state.info.runs;
  $('#served').textContent = `Models: ${runs.map(r => `${r.label} (${r.model})`).join(' | ')}`;
  const gradient = `linear-gradient(to top, ${state.info.colormap.join(', ')})`;
  runs.forEach((run, i) => state.panels.push(makePanel(run, i, gradient)));
  const drop = $('#drop');
  ['dragenter', 'dragover'].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.add('over');
  }));
  ['dragleave', 'drop'].forEach(t => drop.addEventListener(t, e => {
    e.preventDefault(); drop.classList.remove('over');
  }));
  drop.addEventListener('drop', e => {
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  });
  $('#file').addEventListener('change', e => {
    if (e.target.files.length) upload(e.target.files[0]);
    e.target.value = '';
  });
  $('#ood-show').addEventListener('click', () => { show($('#runs'), true); });
}

function makePanel(run, index, gradient) {
  const root = $('#run-template').content.firstElementChild.cloneNode(true);
  root.dataset.run = index;
  $('.run-title', root).textContent = run.label;
  const ood = run.ood ? `OOD gate: ${run.ood.method}, threshold ${fmt(run.ood.threshold)}`
    : 'no OOD gate fitted for this run (stage fit_ood)';
  $('.run-sub', root).textContent =
    `${run.model}, ${run.classes.length} classes, operating point: ${run.threshold_source}; ${ood}`;
  const select = $('.method', root);
  for (const m of run.methods) {
    const opt = document.createElement('option');
    opt.value = m.name;
    opt.textContent = m.slow ? `${m.label} (slow)` : m.label;
    opt.title = m.description;
    select.appendChild(opt);
  }
  $('.cb-gradient', root).style.background = gradient;
  const panel = { root, run, index, sort: { key: 'probability', dir: -1 }, job: null,
                  map: null, contours: null };
  select.addEventListener('change', () => loadMap(panel));
  $('.step', root).addEventListener('change', () => loadMap(panel));
  const slider = $('.opacity', root);
  slider.addEventListener('input', () => {
    $('.heat', root).style.opacity = slider.value / 100;
    $('.opacity-value', root).textContent = `${slider.value}%`;
    updateDownloads(panel);
  });
  $('.show-boxes', root).addEventListener('change', () => drawMarks(panel));
  $('.show-contours', root).addEventListener('change', () => drawMarks(panel));
  $('.cancel', root).addEventListener('click', () => cancelJob(panel));
  root.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
    const key = th.dataset.key;
    panel.sort = { key, dir: panel.sort.key === key ? -panel.sort.dir : (key === 'name' ? 1 : -1) };
    renderTable(panel);
  }));
  show($('.contours-label', root), state.info.segmentation);
  $('#runs').appendChild(root);
  return panel;
}

// ------------------------------------------------------------------------------- upload
async function upload(file) {
  const token = ++state.token;
  show($('#error'), false);
  show($('#ood'), false);
  $('#status').textContent = `Reading ${file.name} (${(file.size / 1048576).toFixed(1)} MB)…`;
  if (file.size > state.info.max_upload_bytes) {
    fail(`${file.name}: ${(file.size / 1048576).toFixed(1)} MB; this server accepts at most ` +
         `${(state.info.max_upload_bytes / 1048576).toFixed(0)} MB.`);
    return;
  }
  let analysis;
  try {
    analysis = await api('/api/analyze', {
      method: 'POST', body: file,
      headers: { 'X-Filename': encodeURIComponent(file.name),
                 'Content-Type': 'application/octet-stream' },
    });
  } catch (e) {
    if (token === state.token) fail(e.message);
    return;
  }
  if (token !== state.token) return;
  state.analysis = analysis;
  const meta = analysis.meta;
  $('#status').textContent = `${analysis.name}: ${analysis.width} × ${analysis.height}, ` +
    `${meta.format} ${meta.bit_depth}-bit ${meta.photometric_interpretation}` +
    ` (analysed in ${analysis.seconds.toFixed(2)} s)`;
  document.body.dataset.analysis = analysis.id;
  const flagged = analysis.runs.filter(r => r.ood && r.ood.flagged);
  if (flagged.length) {
    $('#ood-detail').textContent = flagged.map(r =>
      `${r.label}: score ${fmt(r.ood.score)} above the threshold ${fmt(r.ood.threshold)}`
    ).join('; ') + `. The threshold flags ${Math.round(100 * flagged[0].ood.false_alarm_rate)}% ` +
      'of the X-rays the model was validated on.';
  }
  show($('#ood'), flagged.length > 0);
  show($('#runs'), flagged.length === 0);
  // The first detected finding of the first model, else its most probable class.
  const first = analysis.runs[0];
  const top = first.findings[0] ||
    first.rows.slice().sort((a, b) => b.probability - a.probability)[0].name;
  state.selected = top;
  for (const panel of state.panels) {
    const res = analysis.runs[panel.index];
    const img = $('.xray', panel.root);
    img.src = `/api/analyses/${analysis.id}/image.png`;
    panel.contours = null;
    panel.map = null;
    renderTable(panel);
    drawMarks(panel);
    loadMap(panel);
    if (state.info.segmentation) loadContours(panel, token);
    $('.dl-json', panel.root).href = `/api/analyses/${analysis.id}/runs/${panel.index}/record.json`;
    panel.result = res;
  }
}

function fail(message) {
  $('#status').textContent = '';
  $('#error').textContent = message;
  show($('#error'), true);
}

// ------------------------------------------------------------------------------- findings
function renderTable(panel) {
  const res = state.analysis.runs[panel.index];
  const { key, dir } = panel.sort;
  const rows = res.rows.slice().sort((a, b) => {
    const va = a[key], vb = b[key];
    if (va === vb) return b.probability - a.probability;
    return (va > vb ? 1 : -1) * dir;
  });
  panel.root.querySelectorAll('th').forEach(th => {
    if (th.dataset.key === key) th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    else th.removeAttribute('aria-sort');
  });
  const body = $('tbody', panel.root);
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement('tr');
    tr.dataset.name = row.name;
    tr.classList.toggle('detected', row.detected);
    tr.classList.toggle('selected', row.name === state.selected);
    const name = document.createElement('td');
    name.textContent = row.name;
    const prob = document.createElement('td');
    prob.className = 'num';
    prob.textContent = row.probability.toFixed(3);
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.style.width = `${Math.round(row.probability * 60)}px`;
    prob.appendChild(bar);
    const thr = document.createElement('td');
    thr.className = 'num';
    thr.textContent = row.threshold.toFixed(3);
    const mark = document.createElement('td');
    mark.className = row.detected ? 'mark-yes' : 'mark-no';
    mark.textContent = row.detected ? '✔ detected' : '–';
    tr.append(name, prob, thr, mark);
    tr.addEventListener('click', () => selectFinding(row.name));
    body.appendChild(tr);
  }
}

function selectFinding(name) {
  state.selected = name;
  for (const panel of state.panels) {
    panel.root.querySelectorAll('tbody tr').forEach(
      tr => tr.classList.toggle('selected', tr.dataset.name === name));
    if (panel.run.classes.includes(name)) loadMap(panel);
  }
}

// ------------------------------------------------------------------------------- heat maps
function mapUrl(panel, kind) {
  const a = state.analysis.id;
  const method = $('.method', panel.root).value;
  const step = $('.step', panel.root).value || 0;
  const q = new URLSearchParams({ cls: state.selected, step });
  if (kind === 'overlay') {
    q.set('method', method);
    q.set('opacity', ($('.opacity', panel.root).value / 100).toFixed(2));
    q.set('boxes', $('.show-boxes', panel.root).checked ? '1' : '0');
    return `/api/analyses/${a}/runs/${panel.index}/overlay.png?${q}`;
  }
  return `/api/analyses/${a}/runs/${panel.index}/heatmap/${method}?${q}`;
}

async function loadMap(panel) {
  if (!state.analysis) return;
  const root = panel.root;
  const method = $('.method', root).value;
  if (!method) return;
  const info = panel.run.methods.find(m => m.name === method);
  const token = state.token;
  show($('.map-error', root), false);
  if (panel.job) cancelJob(panel);
  root.dataset.mapState = 'loading';
  try {
    let map;
    try {
      map = await api(mapUrl(panel, 'map'));
    } catch (e) {
      if (!info.slow || !/job/.test(e.message)) throw e;
      const done = await runJob(panel, method);
      if (!done) { root.dataset.mapState = 'cancelled'; return; }
      map = await api(mapUrl(panel, 'map'));
    }
    if (token !== state.token) return;
    showMap(panel, map);
  } catch (e) {
    if (token !== state.token) return;
    root.dataset.mapState = 'error';
    $('.map-error', root).textContent = e.message;
    show($('.map-error', root), true);
  }
}

function showMap(panel, map) {
  const root = panel.root;
  panel.map = map;
  const steps = $('.step', root);
  show($('.step-label', root), map.steps.length > 0);
  if (map.steps.length && steps.options.length !== map.steps.length) {
    steps.replaceChildren(...map.steps.map((s, i) => {
      const o = document.createElement('option'); o.value = i; o.textContent = s; return o;
    }));
    steps.value = map.step;
  }
  const heat = $('.heat', root);
  heat.onload = () => { root.dataset.mapState = 'shown'; };
  heat.src = map.png;
  heat.alt = `heat map: ${map.title}`;
  show(heat, true);
  $('.map-title', root).textContent = map.title;
  $('.cb-max', root).textContent = fmt(map.value_range[1]);
  $('.cb-min', root).textContent = fmt(map.value_range[0]);
  $('.cb-label', root).textContent = map.colorbar;
  show($('.colorbar', root), true);
  drawMarks(panel);
  updateDownloads(panel);
}

function updateDownloads(panel) {
  if (!state.analysis || !panel.map) return;
  $('.dl-png', panel.root).href = mapUrl(panel, 'overlay');
}

// ------------------------------------------------------------------------------- jobs (PDA)
async function runJob(panel, method) {
  const root = panel.root;
  const a = state.analysis.id;
  const job = await api(`/api/analyses/${a}/runs/${panel.index}/jobs/${method}`, { method: 'POST' });
  panel.job = job.job;
  show($('.job', root), true);
  $('.progress', root).value = 0;
  $('.job-text', root).textContent = 'starting…';
  try {
    for (;;) {
      await new Promise(r => setTimeout(r, 250));
      if (panel.job !== job.job) return false;
      const s = await api(`/api/jobs/${job.job}`);
      $('.progress', root).value = s.progress;
      $('.job-text', root).textContent = `${s.state}, ${Math.round(s.progress * 100)}%`;
      if (s.state === 'done') return true;
      if (s.state === 'cancelled') {
        $('.job-text', root).textContent = 'cancelled';
        return false;
      }
      if (s.state === 'error') throw new Error(s.message);
    }
  } finally {
    if (panel.job === job.job) panel.job = null;
    show($('.job', root), false);
  }
}

function cancelJob(panel) {
  if (!panel.job) return;
  const id = panel.job;
  panel.job = null;
  fetch(`/api/jobs/${id}`, { method: 'DELETE' });
  show($('.job', panel.root), false);
  panel.root.dataset.mapState = 'cancelled';
}

// ------------------------------------------------------------------------------- boxes, outlines
async function loadContours(panel, token) {
  try {
    const c = await api(`/api/analyses/${state.analysis.id}/contours`);
    if (token !== state.token) return;
    panel.contours = c.structures;
    $('.legend', panel.root).replaceChildren(...c.structures.map((s, i) => {
      const span = document.createElement('span');
      span.className = `s${i % 5}`;
      span.textContent = `■ ${s.name} `;
      return span;
    }));
    drawMarks(panel);
  } catch (e) {
    $('.legend', panel.root).textContent = `No outlines: ${e.message}`;
  }
}

function drawMarks(panel) {
  const svg = $('.marks', panel.root);
  svg.replaceChildren();
  if (panel.contours && $('.show-contours', panel.root).checked) {
    panel.contours.forEach((s, i) => {
      for (const line of s.lines) {
        const p = document.createElementNS(SVG, 'polygon');
        p.setAttribute('points', line.map(xy => xy.join(',')).join(' '));
        p.setAttribute('class', `contour s${i % 5}`);
        p.setAttribute('vector-effect', 'non-scaling-stroke');
        p.dataset.structure = s.name;
        svg.appendChild(p);
      }
    });
  }
  if (panel.map && $('.show-boxes', panel.root).checked) {
    for (const [x, y, w, h] of panel.map.boxes) {
      for (const cls of ['box-halo', 'box']) {
        const r = document.createElementNS(SVG, 'rect');
        r.setAttribute('x', x); r.setAttribute('y', y);
        r.setAttribute('width', w); r.setAttribute('height', h);
        r.setAttribute('class', cls);
        r.setAttribute('vector-effect', 'non-scaling-stroke');
        svg.appendChild(r);
      }
    }
  }
}

init();
