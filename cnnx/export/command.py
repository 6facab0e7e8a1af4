"""`cnnx export` and `cnnx info` (placeholder until the exporter lands)."""
import click


@click.command()
def export():
    """Export a checkpoint to ONNX / TorchScript / pt2 behind a parity gate."""
    raise click.ClickException("cnnx export is not built yet")


@click.command()
def info():
    """Show an exported model's inputs, outputs, metadata and usable providers."""
    raise click.ClickException("cnnx info is not built yet")
