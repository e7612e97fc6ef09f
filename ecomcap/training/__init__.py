"""SFT and SCST training loops, their data, collation and losses."""
