// The swarm map: polls /api/v1/swarm and draws each model's blocks and servers.
// Everything from the server is set as text, never as HTML.

const REFRESH_MS = 5000;

function describeBlocks(blocks) {
  const ranges = [];
  for (const block of blocks) {
    const last = ranges[ranges.length - 1];
    if (last && block === last[1] + 1) last[1] = block;
    else ranges.push([block, block]);
  }
  return ranges.map(([first, end]) => (first === end ? `${first}` : `${first}–${end}`)).join(", ");
}

function formatNumber(value, digits = 1) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function renderModel(model) {
  const section = document.getElementById("model-template").content.firstElementChild.cloneNode(true);
  section.querySelector(".name").textContent = model.model;
  const badge = section.querySelector(".badge");
  badge.textContent = model.full_route ? "full route" : "no full route";
  badge.classList.add(model.full_route ? "ok" : "down");
  const online = model.servers.filter((server) => server.state === "online").length;
  let summary = `${model.num_blocks} blocks, ${online} online server${online === 1 ? "" : "s"}`;
  if (model.missing_blocks.length) summary += `; no online server holds blocks ${describeBlocks(model.missing_blocks)}`;
  if (model.error) summary += `; lookup failed: ${model.error}`;
  section.querySelector(".summary").textContent = summary;

  const blocks = section.querySelector(".blocks");
  blocks.setAttribute("aria-label", `Servers per block: ${summary}`);
  for (let index = 0; index < model.num_blocks; index += 1) {
    const holders = model.servers.filter((s) => s.state === "online" && s.start <= index && index < s.end).length;
    const cell = document.createElement("span");
    cell.className = holders > 1 ? "block many" : "block";
    cell.dataset.servers = String(holders);
    cell.title = `Block ${index}: ${holders} online server${holders === 1 ? "" : "s"}`;
    blocks.append(cell);
  }

  const rows = section.querySelector("tbody");
  for (const server of model.servers) {
    const row = rows.insertRow();
    const cells = [
      server.public_name ? `${server.public_name} (…${server.peer_id.slice(-8)})` : `…${server.peer_id.slice(-12)}`,
      `${server.start}–${server.end - 1}`,
      server.state,
      formatNumber(server.throughput),
      formatNumber(server.inference_rps),
      server.cache_tokens_left ?? "–",
      server.version ?? "–",
    ];
    cells.forEach((text, column) => {
      const cell = row.insertCell();
      cell.textContent = String(text);
      if (column === 0) {
        cell.className = "peer";
        cell.title = server.peer_id;
      }
    });
  }
  return section;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/api/v1/swarm", { cache: "no-store" });
    const body = await response.json();
    if (!body.ok) throw new Error(body.traceback || `HTTP ${response.status}`);
    document.getElementById("models").replaceChildren(...body.models.map(renderModel));
    const ready = body.models.every((model) => model.full_route);
    status.textContent = `${ready ? "Every model can run." : "Some models cannot run."} ` +
      `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (error) {
    status.textContent = `Could not load the swarm map: ${error.message}. Retrying…`;
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
