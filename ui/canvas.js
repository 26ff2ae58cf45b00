// The dashboard's drawing canvas: a Streamlit components-v2 module, served after the notebook widget's
// painter.js (createPainter). The query's view lies under the paint; undo, redo and clear sit above it.
// A finished stroke, an undo, a redo or a clear sends the shapes and the paint (a PNG data URL whose alpha
// is the paint) at once, so the page reruns on mouse-up. Focused (by a stroke or a click on its buttons),
// the canvas takes Ctrl+Z (undo) and Ctrl+Shift+Z or Ctrl+Y (redo); ⌘ on a Mac.

const mounted = new WeakMap(); // parentElement → its canvas: Streamlit calls this module again on every rerun

function mount(parentElement, setStateValue) {
  const root = document.createElement("div");
  root.className = "vfs-canvas";
  const bar = document.createElement("div");
  bar.className = "vfs-canvas-bar";
  const buttons = {};
  for (const [name, title] of [
    ["Undo", "Remove the last stroke (Ctrl+Z)"],
    ["Redo", "Bring back the last stroke undone (Ctrl+Shift+Z)"],
    ["Clear", "Remove every stroke"],
  ]) {
    const node = document.createElement("button");
    Object.assign(node, { type: "button", textContent: name, title });
    bar.appendChild(node);
    buttons[name] = node;
  }
  const stage = document.createElement("div");
  stage.className = "vfs-stage";
  stage.tabIndex = 0; // focused by a stroke, so that the canvas takes the undo and redo keys
  const view = document.createElement("img");
  Object.assign(view, { className: "vfs-view", alt: "the query as the model saw it", draggable: false });
  const canvas = document.createElement("canvas");
  canvas.className = "vfs-paint";
  stage.append(view, canvas);
  root.append(bar, stage);
  parentElement.appendChild(root);

  const state = { data: null };
  function showButtons() {
    buttons.Undo.disabled = !state.painter.canUndo;
    buttons.Redo.disabled = !state.painter.canRedo;
    buttons.Clear.disabled = !state.painter.canUndo;
  }
  state.painter = createPainter(canvas, {
    settings: () => ({ tool: state.data.tool, brush: state.data.brush }),
    changed: (shapes) => {
      showButtons();
      setStateValue("drawing", { shapes, paint: shapes.length ? canvas.toDataURL("image/png") : null });
    },
  });
  buttons.Undo.addEventListener("click", () => state.painter.undo());
  buttons.Redo.addEventListener("click", () => state.painter.redo());
  buttons.Clear.addEventListener("click", () => state.painter.clear());
  canvas.addEventListener("pointerdown", () => stage.focus({ preventScroll: true }));
  root.addEventListener("keydown", (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.altKey) return;
    const key = event.key.toLowerCase();
    if (key === "z" && !event.shiftKey) state.painter.undo();
    else if ((key === "z" && event.shiftKey) || key === "y") state.painter.redo();
    else return;
    event.preventDefault();
  });
  state.show = (data) => {
    const first = state.data === null;
    state.data = data;
    if (first) {
      canvas.width = canvas.height = data.size;
      stage.style.width = stage.style.height = `${data.size}px`;
      state.painter.set(data.shapes || []); // the region drawn on another page
    }
    if (view.getAttribute("src") !== data.background) view.src = data.background;
    showButtons();
  };
  return state;
}

export default function ({ data, parentElement, setStateValue }) {
  let state = mounted.get(parentElement);
  if (!state) {
    state = mount(parentElement, setStateValue);
    mounted.set(parentElement, state);
  }
  state.show(data);
}
