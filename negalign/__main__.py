from negalign.cli import app

app(prog_name="negalign")
