"""The image-search web app: `app.ui.build_app` (the page), `app.server` (a safe launch and
`serve`), `app.views` (what the page shows, as plain functions over an `ImageIndex`), and
`app.api` (the HTTP API under ``/api/v1``, served beside the page or alone; no Gradio).

Start it with ``mocoretrieval serve --index DIR`` or ``python -m app --index DIR``.
"""
