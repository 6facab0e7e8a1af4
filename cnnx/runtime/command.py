"""`cnnx classify` (placeholder until the runtime lands)."""
import click


@click.command()
def classify():
    """Batch-classify images and folders through onnxruntime."""
    raise click.ClickException("cnnx classify is not built yet")
