// TaoNode Guardian fleet page: applies the server's event stream (/events) to the tables the
// server already rendered. No framework, no CDN; the page works without this script.
'use strict';
(function () {
  var live = document.getElementById('live');
  var liveNode = document.body.dataset.liveNode || '';
  var fleet = document.querySelector('#fleet tbody');

  function setLive(state) {
    if (!live) return;
    live.dataset.state = state;
    live.textContent = state;
  }

  function age(ms) {
    if (!ms || ms <= 0) return 'never';
    var s = Math.max(0, Math.floor((Date.now() - ms) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.floor(s / 60) + ' min ago';
    if (s < 86400) return Math.floor(s / 3600) + ' h ago';
    return Math.floor(s / 86400) + ' d ago';
  }

  function tick() {
    document.querySelectorAll('[data-ms]').forEach(function (el) {
      el.textContent = age(Number(el.dataset.ms));
    });
  }

  function cell(tr, key) {
    return tr.querySelector('[data-k="' + key + '"]');
  }

  function newRow(row) {
    var tr = document.createElement('tr');
    tr.id = 'n-' + row.node;
    tr.dataset.node = row.node;
    ['node', 'network', 'phase', 'risk', 'lag', 'peers', 'gpu', 'last', 'findings'].forEach(function (key) {
      var td = document.createElement('td');
      td.dataset.k = key;
      if (['risk', 'lag', 'peers', 'findings'].indexOf(key) >= 0) td.className = 'num';
      tr.appendChild(td);
    });
    var link = document.createElement('a');
    link.href = '/nodes/' + encodeURIComponent(row.node);
    link.textContent = row.node;
    cell(tr, 'node').appendChild(link);
    cell(tr, 'phase').appendChild(document.createElement('span'));
    var empty = document.getElementById('empty');
    if (empty) empty.remove();
    return tr;
  }

  // Returns whether the row's place in the order may have changed.
  function fill(tr, row) {
    var moved = tr.dataset.sortRisk !== String(row.sort_risk) || tr.dataset.phaseRank !== String(row.phase_rank);
    tr.dataset.sortRisk = row.sort_risk;
    tr.dataset.phaseRank = row.phase_rank;
    tr.className = row.connected ? '' : 'away';
    cell(tr, 'network').textContent = row.network;
    var phase = cell(tr, 'phase').firstChild;
    phase.className = 'phase phase-' + row.phase;
    phase.textContent = row.phase;
    cell(tr, 'risk').textContent = row.risk_text;
    cell(tr, 'lag').textContent = row.lag;
    cell(tr, 'peers').textContent = row.peers;
    var gpu = cell(tr, 'gpu');
    gpu.textContent = row.gpu;
    gpu.className = row.gpu_alert ? 'alert' : '';
    var last = cell(tr, 'last');
    last.dataset.ms = row.last_sample_unix_ms;
    last.textContent = age(row.last_sample_unix_ms);
    cell(tr, 'findings').textContent = row.open_findings;
    return moved;
  }

  // Worst first, as the server sorts: sort risk, then phase rank, then node id.
  function before(a, b) {
    var ra = Number(a.dataset.sortRisk), rb = Number(b.dataset.sortRisk);
    if (ra !== rb) return ra > rb;
    var pa = Number(a.dataset.phaseRank), pb = Number(b.dataset.phaseRank);
    if (pa !== pb) return pa > pb;
    return a.dataset.node < b.dataset.node;
  }

  function place(tr) {
    var rows = Array.prototype.slice.call(fleet.rows).filter(function (r) { return r !== tr; });
    var next = null;
    for (var i = 0; i < rows.length; i++) {
      if (before(tr, rows[i])) { next = rows[i]; break; }
    }
    if (tr.nextSibling !== next || tr.parentNode !== fleet) fleet.insertBefore(tr, next);
  }

  function summary() {
    var rows = Array.prototype.slice.call(fleet.rows);
    var phases = {};
    var connected = 0;
    var risk = 0;
    rows.forEach(function (r) {
      var p = cell(r, 'phase').textContent;
      phases[p] = (phases[p] || 0) + 1;
      if (r.className !== 'away') connected++;
      risk = Math.max(risk, Number(cell(r, 'risk').textContent));
    });
    var set = function (key, text) {
      var el = document.querySelector('#summary [data-k="' + key + '"]');
      if (el) el.textContent = text;
    };
    set('nodes', rows.length);
    set('connected', connected);
    set('fleet-risk', risk.toFixed(2));
    set('phases', Object.keys(phases).sort().map(function (p) { return p + ' ' + phases[p]; }).join(', '));
  }

  // Only a row whose sort keys changed (or a new one) is moved; the summary is recounted once
  // per burst of events, so a large fleet costs the browser little per update.
  var summaryDue = false;
  function applyFleet(row) {
    var existing = document.getElementById('n-' + row.node);
    var tr = existing || newRow(row);
    if (fill(tr, row) || !existing) place(tr);
    if (!summaryDue) {
      summaryDue = true;
      setTimeout(function () { summaryDue = false; summary(); }, 200);
    }
  }

  function applyNode(row) {
    if (row.node !== liveNode) return;
    var set = function (key, text, cls) {
      var el = document.querySelector('main [data-k="' + key + '"]');
      if (!el) return;
      el.textContent = text;
      if (cls !== undefined) el.className = cls;
    };
    set('phase', row.phase, 'phase phase-' + row.phase);
    set('risk', row.risk_text);
    set('connected', row.connected ? 'connected' : 'away');
    set('lag', row.lag);
    set('peers', row.peers);
    set('gpu', row.gpu);
    set('findings', row.open_findings);
  }

  setInterval(tick, 1000);
  if (!fleet && !liveNode) return;
  if (!window.EventSource) return;
  setLive('connecting');
  var source = new EventSource(liveNode ? '/events?node=' + encodeURIComponent(liveNode) : '/events');
  source.onopen = function () { setLive('live'); };
  source.onerror = function () { setLive('reconnecting'); };
  source.addEventListener('node', function (event) {
    var row = JSON.parse(event.data);
    if (fleet) applyFleet(row); else applyNode(row);
    setLive('live');
  });
})();
