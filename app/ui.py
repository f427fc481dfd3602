"""The Gradio Blocks page: layout and event wiring over `app.views`, no logic of its own."""

from __future__ import annotations

from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from mocoretrieval.index import DEFAULT_DUPLICATE_THRESHOLD

from . import views

TITLE = "mocoretrieval: image search"
# Local font stacks: the default theme would fetch Google Fonts, i.e. tell a third party each
# time someone opens a private photo search.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "monospace"],
)
N_EXAMPLES = 8


def build_app(
    index: Any, k_default: int = 10, max_upload_mb: float = views.MAX_UPLOAD_MB
) -> gr.Blocks:
    """The search page over an open index; launch it with :func:`app.server.launch`.

    Args:
        index: an open :class:`~mocoretrieval.index.ImageIndex` (its encoder already loaded).
        k_default: how many neighbours to show at first.
        max_upload_mb: uploads above this are refused (also enforced by ``launch``).

    Returns:
        The page, not launched. Its API has one public endpoint, ``/search`` (image, k) ->
        (gallery, message), which is what `gradio_client` calls.
    """
    k_default = views.clamp_k(k_default)

    def search_upload(path: str, k: int) -> views.SearchOutcome:
        # The payload is not preprocessed: only a file Gradio itself received may be read.
        uploads = get_upload_folder()
        return views.search_upload(index, path, k, max_upload_mb, upload_dir=uploads)

    def show(outcome: views.SearchOutcome, query: tuple[str, str] | None) -> tuple:
        return outcome.items, outcome.message, outcome.paths, query

    def on_upload(payload: dict | None, k: int) -> tuple:
        path = payload.get("path") if isinstance(payload, dict) else None
        if path is None:  # the query image was cleared
            return [], "", [], None
        return show(search_upload(path, k), ("upload", path))

    def on_pick(paths: list[str], k: int, evt: gr.SelectData) -> tuple:
        rel = paths[evt.index] if paths and 0 <= evt.index < len(paths) else None
        if rel is None:
            return (gr.skip(),) * 5
        thumb = views.query_thumbnail(index, rel)
        return (thumb, *show(views.search_indexed(index, rel, k), ("indexed", rel)))

    def on_k(query: tuple[str, str] | None, k: int) -> tuple:
        if query is None:
            return (gr.skip(),) * 4
        kind, value = query
        if kind == "upload":
            return show(search_upload(value, k), query)
        return show(views.search_indexed(index, value, k), query)

    def on_duplicates(threshold: float) -> tuple:
        found = views.find_duplicates(index, threshold)
        choice = found.labels[0] if found.labels else None
        return (
            found.message,
            gr.update(choices=found.labels, value=choice),
            *on_group(choice, found.groups, found.labels, found.keepers),
            found.groups,
            found.labels,
            found.keepers,
        )

    def on_group(
        label: str | None, groups: list[list[str]], labels: list[str], keepers: list[str]
    ) -> tuple:
        members = views.picked_group(groups, labels, label)
        keeper = keepers[labels.index(label)] if members else None
        return (
            views.group_items(index, groups, label, labels),
            gr.update(choices=members, value=keeper),
            *confirming(False),
        )

    def confirming(shown: bool) -> tuple:
        return gr.update(visible=shown), gr.update(visible=shown)

    def on_trash(label: str | None, groups: list, labels: list, keep: str | None) -> tuple:
        members = views.picked_group(groups, labels, label)
        if not members or keep not in members:
            return "**Pick a group and the copy to keep first.**", *confirming(False)
        ask = f"Trash {len(members) - 1} file(s) and keep `{keep}`? Confirm below."
        return ask, *confirming(True)

    def on_confirm(label: str | None, groups: list, labels: list, keep: str | None) -> tuple:
        members = views.picked_group(groups, labels, label)
        return views.trash_others(index, members, keep), *confirming(False)

    def on_not_duplicates(label: str | None, groups: list, labels: list) -> str:
        return views.mark_not_duplicates(index, views.picked_group(groups, labels, label))

    examples = views.example_items(index, N_EXAMPLES)

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(f"# {TITLE}\nIndexed folders: `{getattr(index, 'roots', index.root)}`")
        paths = gr.State([])  # relative paths of the result gallery, in order
        last_query = gr.State(None)  # ("upload", cache path) | ("indexed", relative path)
        with gr.Tab("Search"), gr.Row():
            with gr.Column(scale=1, min_width=260):
                query = gr.Image(
                    label="Query: upload or paste an image",
                    type="filepath",
                    sources=["upload", "clipboard"],
                    height=280,
                    elem_id="query",
                )
                k = gr.Slider(1, views.MAX_K, value=k_default, step=1, label="Results (k)")
                example_gallery = gr.Gallery(
                    value=[(img, rel) for img, rel in examples],
                    label="Or start from an image of the index",
                    columns=4,
                    height=200,
                    allow_preview=False,
                    elem_id="examples",
                )
                example_paths = gr.State([rel for _, rel in examples])
            with gr.Column(scale=3):
                message = gr.Markdown(elem_id="message")
                gallery = gr.Gallery(
                    label="Nearest images (click one to search from it)",
                    columns=5,
                    height="auto",
                    format="jpeg",
                    allow_preview=False,
                    elem_id="results",
                )
        with gr.Tab("Near-duplicates"):
            with gr.Row():
                threshold = gr.Slider(
                    views.MIN_DUPLICATE_THRESHOLD,
                    1.0,
                    value=DEFAULT_DUPLICATE_THRESHOLD,
                    step=0.001,
                    label="Similarity ≥",
                    elem_id="threshold",
                )
                find = gr.Button("Find near-duplicates")
            dup_message = gr.Markdown(elem_id="dup-message")
            group = gr.Dropdown(
                label="Group (tier, suggested copy to keep)", choices=[], interactive=True
            )
            group_gallery = gr.Gallery(
                label="Images in the group",
                columns=5,
                format="jpeg",
                allow_preview=True,
                elem_id="group",
            )
            with gr.Row():
                keep = gr.Dropdown(
                    label="Keep this copy", choices=[], interactive=True, elem_id="keep"
                )
                trash = gr.Button("Trash the others…", elem_id="trash")
                not_dups = gr.Button("Not duplicates", elem_id="not-duplicates")
            with gr.Row():
                confirm = gr.Button("Confirm: trash", variant="stop", visible=False)
                cancel = gr.Button("Cancel", visible=False)
            action_message = gr.Markdown(elem_id="action-message")
            groups, labels, keepers = gr.State([]), gr.State([]), gr.State([])
        with gr.Tab("Index"):
            summary = gr.Markdown(views.index_summary(index), elem_id="summary")

        results = [gallery, message, paths, last_query]
        # preprocess=False: the handler gets the uploaded file's path and decodes it itself, so
        # a corrupt or non-image upload gets a clear message rather than Gradio's bare "Error".
        query.input(
            on_upload,
            [query, k],
            results,
            api_name="search",
            preprocess=False,
            trigger_mode="always_last",
        )
        pick = {"outputs": [query, *results], "api_visibility": "private"}
        gallery.select(on_pick, [paths, k], **pick)
        example_gallery.select(on_pick, [example_paths, k], **pick)
        k.release(on_k, [last_query, k], results, api_visibility="private")
        private = {"api_visibility": "private"}
        picked = [group_gallery, keep, confirm, cancel]
        listing = [dup_message, group, *picked, groups, labels, keepers]
        find.click(on_duplicates, threshold, listing, **private)
        group.input(on_group, [group, groups, labels, keepers], picked, **private)
        chosen = [group, groups, labels, keep]
        trash.click(on_trash, chosen, [action_message, confirm, cancel], **private)
        cancel.click(lambda: confirming(False), None, [confirm, cancel], **private)
        confirm.click(on_confirm, chosen, [action_message, confirm, cancel], **private).then(
            on_duplicates, threshold, listing, **private
        )
        not_dups.click(on_not_duplicates, [group, groups, labels], action_message, **private).then(
            on_duplicates, threshold, listing, **private
        )
        # Re-read on each page load: `mocoretrieval index` may have updated the index meanwhile
        # (searches see such updates too: the index reloads its FAISS file when it changed).
        page.load(lambda: views.index_summary(index), None, summary, api_visibility="private")
    return page
