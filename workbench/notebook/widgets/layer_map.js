// Per-layer map: one cell per layer, coloured by sensitivity (metric drop) or sparsity; a click excludes the
// layer from pruning/quantization (or includes it again). The choice syncs back to Python as `excluded`.
function colour(value, mode) {
  if (value === null || value === undefined || Number.isNaN(value)) return "#eeeeee";
  if (mode === "sensitivity") {
    const t = Math.max(0, Math.min(1, -value / 0.2)); // a drop of 20 points or more is full red
    return `rgb(255, ${Math.round(255 - 180 * t)}, ${Math.round(255 - 200 * t)})`;
  }
  const t = Math.max(0, Math.min(1, value)); // share (sparsity, params) 0..1
  return `rgb(${Math.round(235 - 200 * t)}, ${Math.round(240 - 130 * t)}, 255)`;
}

function label(value, mode) {
  if (value === null || value === undefined) return "";
  return mode === "sensitivity" ? `Δ ${value.toFixed(3)}` : `${(100 * value).toFixed(0)}%`;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "wb-layer-map";
  el.appendChild(root);

  function draw() {
    const mode = model.get("colour_by");
    const excluded = new Set(model.get("excluded"));
    root.innerHTML = "";
    const title = document.createElement("div");
    title.className = "wb-layer-map-title";
    title.textContent = `${model.get("title")} (colour: ${mode}; click a layer to leave it out)`;
    root.appendChild(title);
    const grid = document.createElement("div");
    grid.className = "wb-layer-grid";
    for (const layer of model.get("layers")) {
      const cell = document.createElement("button");
      cell.className = "wb-layer" + (excluded.has(layer.name) ? " wb-excluded" : "");
      cell.dataset.layer = layer.name;
      cell.style.background = excluded.has(layer.name) ? "#d0d0d0" : colour(layer.value, mode);
      cell.title = `${layer.name} (${layer.type}), ${layer.params.toLocaleString()} weights` +
        (excluded.has(layer.name) ? " — excluded" : "");
      cell.innerHTML = `<span class="wb-name">${layer.name}</span><span class="wb-type">${layer.type}</span>` +
        `<span class="wb-value">${excluded.has(layer.name) ? "excluded" : label(layer.value, mode)}</span>`;
      cell.addEventListener("click", () => {
        const now = new Set(model.get("excluded"));
        if (now.has(layer.name)) now.delete(layer.name); else now.add(layer.name);
        model.set("excluded", [...now]);
        model.save_changes();
      });
      grid.appendChild(cell);
    }
    root.appendChild(grid);
  }

  model.on("change:layers", draw);
  model.on("change:excluded", draw);
  model.on("change:colour_by", draw);
  draw();
}

export default { render };
