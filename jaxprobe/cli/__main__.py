from jaxprobe.cli import app

app()
