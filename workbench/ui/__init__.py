"""The Python side of the workbench's notebook UI: the control panel and the per-layer map widget."""
