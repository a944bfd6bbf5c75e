// tidings console: the live tail (server-sent events) and the action buttons. No build step.
"use strict";

function flash(text, ok) {
  const box = document.getElementById("flash");
  if (!box) return;
  box.textContent = text;
  box.className = ok ? "ok" : "fail";
  box.hidden = false;
}

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function link(href, text, className) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (className) a.className = className;
  return a;
}

function eventRow(e) {
  const tr = document.createElement("tr");
  tr.className = "fresh";
  tr.dataset.position = e.position;
  tr.appendChild(cell(String(e.position), "num"));
  const stream = cell("");
  stream.appendChild(link("/streams/" + encodeURIComponent(e.stream_id), e.stream_id));
  tr.appendChild(stream);
  tr.appendChild(cell(String(e.version), "num"));
  const type = cell("");
  type.appendChild(link("/events/" + e.event_id, e.event_type, "type"));
  tr.appendChild(type);
  tr.appendChild(cell(e.timestamp.replace("T", " ").slice(0, 19), "when"));
  const data = cell("", "data");
  const code = document.createElement("code");
  const json = JSON.stringify(e.data);
  code.textContent = json.length > 120 ? json.slice(0, 117) + "..." : json;
  data.appendChild(code);
  tr.appendChild(data);
  return tr;
}

function startTail(holder) {
  const target = document.querySelector(holder.dataset.tailTarget);
  const status = document.getElementById("tail-status");
  const source = new EventSource(holder.dataset.tail);
  source.onopen = () => { if (status) { status.textContent = "live"; status.className = "badge on"; } };
  source.onerror = () => { if (status) { status.textContent = "reconnecting"; status.className = "badge off"; } };
  source.addEventListener("tidings-event", (message) => {
    const event = JSON.parse(message.data);
    const empty = target.querySelector("td.empty");
    if (empty) empty.parentElement.remove();
    target.insertBefore(eventRow(event), target.firstChild);
    while (target.rows.length > 500) target.deleteRow(target.rows.length - 1);
  });
}

async function act(button) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  const input = document.getElementById("token");
  const token = input ? input.value.trim() : "";
  if (token) sessionStorage.setItem("tidings-token", token);
  const headers = token ? { Authorization: "Bearer " + token } : {};
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.action, { method: "POST", headers });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      flash(`${response.status}: ${body.detail || response.statusText}`, false);
      return;
    }
    flash(body.detail + (body.error ? ": " + body.error : ""), body.outcome !== "failed");
    if (body.outcome !== "failed") {
      const row = button.closest("tr[data-dead-letter]");
      if (row) row.remove();
      if (button.dataset.then) setTimeout(() => { window.location = button.dataset.then; }, 800);
    }
  } catch (error) {
    flash("request failed: " + error, false);
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const input = document.getElementById("token");
  if (input) input.value = sessionStorage.getItem("tidings-token") || "";
  document.querySelectorAll("[data-tail]").forEach(startTail);
  document.querySelectorAll("button[data-action]").forEach((button) => {
    button.addEventListener("click", () => act(button));
  });
});
