"""imglora-data: dataset preparation and checks before training (`imglora-data --help`)."""
