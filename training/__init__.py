"""MoCo pretraining: recipes, model, engine, export (imports neither faiss nor gradio)."""
