using VlmTune.Bench;

// Each benchmark prints what it measured; see bench/README.md.
return args.FirstOrDefault() switch
{
    "oogiri" => OogiriBench.Run(args.Skip(1).ToArray()),
    _ => Usage(),
};

static int Usage()
{
    Console.Error.WriteLine("usage: VlmTune.Bench oogiri [--lines N] [--dir DIR] [--validate]");
    return 2;
}
