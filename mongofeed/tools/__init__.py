"""The command line (``mongofeed ...``) and what its commands do beyond serving: inspect a
config against the data, load data sets, generate the configuration reference."""
