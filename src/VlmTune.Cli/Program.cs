using VlmTune.Cli.Commands;

// Program only wires: the tree is in CliRoot, each command lives in Commands/ with its options and behaviour.
return await CliRoot.Create().Parse(args).InvokeAsync();
