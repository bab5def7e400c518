// The route ribbon: under a reply, which swarm servers computed it, and how fast.

/** A peer id shortened to what a person can compare at a glance (its last six characters). */
export function shortPeer(peerId) {
  return "…" + peerId.slice(-6);
}

/**
 * The ribbon for a generation's route trace (the `route` of its last reply): one chip per
 * server span, "…abc123 0–15 · 41 ms", then any failures. Text only: nothing from the server
 * becomes markup.
 */
export function routeRibbon(route) {
  const ribbon = document.createElement("div");
  ribbon.className = "route-ribbon";
  ribbon.setAttribute("aria-label", "Route through the swarm");
  for (const span of route.spans) {
    const chip = document.createElement("span");
    chip.className = "route-span";
    const [start, end] = span.blocks;
    chip.textContent = `${shortPeer(span.peer_id)} ${start}–${end} · ${Math.round(span.ms_per_step)} ms`;
    chip.title = `${span.peer_id}: blocks ${start} to ${end - 1}, ${span.steps} steps, ` +
      `${Math.round(100 * span.share)}% of the step time`;
    ribbon.append(chip);
  }
  if (route.failures) {
    const failures = document.createElement("span");
    failures.className = "route-failures";
    failures.textContent = `${route.failures} failover${route.failures > 1 ? "s" : ""}`;
    failures.title = route.events.map((event) =>
      `step ${event.step}: ${shortPeer(event.peer_id)} (blocks ${event.blocks[0]}–${event.blocks[1]}) failed: ` +
      event.reason).join("\n");
    ribbon.append(failures);
  }
  return ribbon;
}
