// The dashboard's drawing canvas: a Streamlit components-v2 module, served after the notebook widget's
// painter.js (createPainter). The query's view lies under the paint; undo, redo and clear sit above it.
// A finished stroke, an undo, a redo or a clear sends the shapes and the paint (a PNG data URL whose alpha
// is the paint) at once, so the page reruns on mouse-up.

const mounted = new WeakMap(); // parentElement → its canvas: Streamlit calls this module again on every rerun

function mount(parentElement, setStateValue) {
  const root = document.createElement("div");
  root.className = "vfs-canvas";
  const bar = document.createElement("div");
  bar.className = "vfs-canvas-bar";
  const stage = document.createElement("div");
  stage.className = "vfs-stage";
  const view = document.createElement("img");
  Object.assign(view, { className: "vfs-view", alt: "the query as the model saw it", draggable: false });
  const canvas = document.createElement("canvas");
  canvas.className = "vfs-paint";
  stage.append(view, canvas);
  root.append(bar, stage);
  parentElement.appendChild(root);

  const state = { data: null };
  const painter = createPainter(canvas, {
    settings: () => ({ tool: state.data.tool, brush: state.data.brush, grid: state.data.grid }),
    changed: (shapes) =>
      setStateValue("drawing", { shapes, paint: shapes.length ? canvas.toDataURL("image/png") : null }),
    bar,
    keys: root,
  });
  state.show = (data) => {
    if (state.data === null) {
      canvas.width = canvas.height = data.size;
      // its size, or the window's width on a narrow window (a phone): the painter maps the pointer by
      // the shown size, and the paint stays size × size pixels
      Object.assign(stage.style, { width: `min(${data.size}px, 100%)`, aspectRatio: "1" });
      painter.set(data.shapes || [], data.undo_to); // the region drawn on another page, or loaded
    }
    state.data = data;
    if (view.getAttribute("src") !== data.background) view.src = data.background;
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
