"""Click commands: thin, they parse, call one library function, print."""
