// The executions page: polls the JSON API of `labelmark serve` and redraws the list and the
// selected execution, so new runs and status changes show without a reload.
"use strict";

const POLL_MS = 1000;
let selected = null;
let definition = null;

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

// The Guard ends a skipped run in a Succeed state, so Step Functions reports it as SUCCEEDED and
// the API sends the reason in `skipped`.
function shownStatus(run) {
  return run.skipped ? "SKIPPED" : run.status;
}

function renderList(executions) {
  const body = document.querySelector("#executions tbody");
  body.replaceChildren();
  for (const run of executions) {
    const row = body.insertRow();
    row.dataset.name = run.name;
    if (run.name === selected) row.classList.add("selected");
    cell(row, run.name);
    const status = shownStatus(run);
    const statusCell = cell(row, status, `status ${status}`);
    if (run.skipped) statusCell.title = run.skipped;
    else if (run.failedState) statusCell.title = `${run.error} in ${run.failedState}`;
    cell(row, run.key);
    cell(row, run.labels.slice(0, 3).join(", "));
    cell(row, run.seconds == null ? "-" : `${run.seconds.toFixed(2)} s`);
    row.addEventListener("click", () => { selected = run.name; refresh(); });
  }
}

// Lay the states out by their distance from StartAt: one row per distance, boxes side by side.
function layout(states, startAt) {
  const depth = { [startAt]: 0 };
  const queue = [startAt];
  while (queue.length) {
    const name = queue.shift();
    for (const next of successors(states[name])) {
      if (!(next in depth)) { depth[next] = depth[name] + 1; queue.push(next); }
    }
  }
  const rows = [];
  for (const [name, level] of Object.entries(depth)) (rows[level] ||= []).push(name);
  const position = {};
  rows.forEach((names, level) => names.forEach((name, index) => {
    position[name] = { x: 10 + index * 150, y: 10 + level * 60 };
  }));
  return position;
}

function successors(state) {
  const next = [];
  if (state.Next) next.push(state.Next);
  if (state.Default) next.push(state.Default);
  for (const choice of state.Choices || []) next.push(choice.Next);
  for (const rule of state.Catch || []) next.push(rule.Next);
  return [...new Set(next)];
}

function renderGraph(stateStatus) {
  const svgNs = "http://www.w3.org/2000/svg";
  const position = layout(definition.States, definition.StartAt);
  const width = Math.max(...Object.values(position).map((p) => p.x)) + 150;
  const height = Math.max(...Object.values(position).map((p) => p.y)) + 50;
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.innerHTML = '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker></defs>';
  for (const [name, state] of Object.entries(definition.States)) {
    for (const next of successors(state)) {
      const from = position[name], to = position[next];
      if (!from || !to) continue;
      const line = document.createElementNS(svgNs, "line");
      line.setAttribute("class", "edge");
      line.setAttribute("x1", from.x + 65); line.setAttribute("y1", from.y + 30);
      line.setAttribute("x2", to.x + 65); line.setAttribute("y2", to.y);
      svg.appendChild(line);
    }
  }
  for (const [name, p] of Object.entries(position)) {
    const group = document.createElementNS(svgNs, "g");
    group.setAttribute("class", `state ${stateStatus[name] || "not-run"}`);
    group.dataset.state = name;
    group.innerHTML = `<rect x="${p.x}" y="${p.y}" width="130" height="30" rx="6"></rect>`;
    const label = document.createElementNS(svgNs, "text");
    label.setAttribute("x", p.x + 65); label.setAttribute("y", p.y + 15);
    label.textContent = name;
    group.appendChild(label);
    svg.appendChild(group);
  }
  document.getElementById("graph").replaceChildren(svg);
}

function renderDetail(run) {
  document.getElementById("detail").hidden = false;
  document.getElementById("detail-name").textContent = run.name;
  const status = document.getElementById("detail-status");
  status.textContent = shownStatus(run);
  status.className = `status ${shownStatus(run)}`;
  const skipped = document.getElementById("detail-skipped");
  skipped.hidden = !run.skipped;
  skipped.textContent = run.skipped ? `Skipped by the Guard state: ${run.skipped}` : "";
  const replayOf = run.replayOf ? ` · replay of ${run.replayOf} from ${run.resumedFrom || "the start"}` : "";
  const replayedAs = run.replayedAs ? ` · replayed successfully as ${run.replayedAs}` : "";
  document.getElementById("detail-info").textContent =
    `${run.key || ""} · attempt ${run.attempt}${replayOf}${replayedAs}`;
  renderError(run);
  // The server offers a replay only for a failed run whose chain has no succeeded attempt.
  document.getElementById("replay").hidden = !run.replayable;
  renderGraph(run.states);

  const image = document.getElementById("output-image");
  const source = `/api/executions/${encodeURIComponent(run.name)}/image`;
  image.hidden = !run.hasImage;
  if (run.hasImage && image.dataset.src !== source) { image.dataset.src = source; image.src = source; }

  const body = document.querySelector("#events tbody");
  body.replaceChildren();
  for (const event of run.events) {
    const row = body.insertRow();
    cell(row, event.id); cell(row, event.type); cell(row, event.state); cell(row, event.timestamp);
  }
  document.getElementById("input").textContent = JSON.stringify(run.input, null, 2);
  document.getElementById("output").textContent = JSON.stringify(run.output, null, 2);
}

// Show one line with the error type, the state and the message. The whole cause, which for a Lambda
// error is JSON with a stack trace, stays folded in a <details> element until it is opened.
function renderError(run) {
  const block = document.getElementById("detail-error");
  block.hidden = !run.error;
  if (!run.error) return;
  const where = run.failedState ? ` in ${run.failedState}` : "";
  const message = run.errorMessage ? `: ${run.errorMessage}` : "";
  document.getElementById("error-summary").textContent = `${run.error}${where}${message}`;

  const cause = document.getElementById("error-cause");
  // The page redraws every second, so the element is folded again only when another run is shown.
  if (cause.dataset.name !== run.name) { cause.open = false; cause.dataset.name = run.name; }
  cause.hidden = !run.cause;
  document.getElementById("cause").textContent = run.cause || "";
}

async function refresh() {
  try {
    definition ||= await getJson("/api/definition");
    const { executions } = await getJson("/api/executions");
    renderList(executions);
    if (selected) renderDetail(await getJson(`/api/executions/${encodeURIComponent(selected)}`));
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("refreshed").textContent = `refresh failed: ${error.message}`;
  }
}

document.getElementById("replay").addEventListener("click", async () => {
  const message = document.getElementById("replay-message");
  // The server accepts only same-origin JSON posts, so a form on another site cannot start a replay.
  const response = await fetch(`/api/executions/${encodeURIComponent(selected)}/replay`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: "{}",
  });
  const body = await response.json();
  message.textContent = response.ok ? `started ${body.replay}` : body.error;
  if (response.ok) { selected = body.replay; refresh(); }
});

refresh();
setInterval(refresh, POLL_MS);
