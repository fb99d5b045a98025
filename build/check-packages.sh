#!/usr/bin/env bash
# Packs the vlmtune tool and the VlmTune library as users get them and checks on this machine that they work:
# - the tool, installed with `dotnet tool install`, prints help under its own name and runs real commands (its natives
#   are there and load, on Debian 12 too);
# - a new console app outside the repository with nothing but a PackageReference to the library runs a TorchSharp op
#   through it (the package's buildTransitive patch).
# Usage: build/check-packages.sh      (CI runs it; about a minute and a half on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD
fixtures=${VLMTUNE_FIXTURES:-$repo/../shared/fixtures}
packages=${NUGET_PACKAGES:-$HOME/.nuget/packages}
# A version of its own, so that no package cached by an earlier run stands in for the one packed now.
version=0.0.0-check.$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/vlmtune-packages.XXXXXX")
cleanup() {
  rm -rf "$work" "$packages/vlmtune/$version" "$packages/vlmtune.cli/$version"
  rmdir "$packages/vlmtune" "$packages/vlmtune.cli" 2>/dev/null || true   # only where no other version is cached
}
trap cleanup EXIT
fail() { echo "check-packages: $*" >&2; exit 1; }

dotnet pack src/VlmTune.Cli -c Release -p:Version="$version" -o "$work/feed" -v q -nologo
dotnet pack src/VlmTune -c Release -p:Version="$version" -o "$work/feed" -v q -nologo
size=$(stat -c %s "$work/feed/VlmTune.Cli.$version.nupkg")
echo "check-packages: VlmTune.Cli.nupkg $((size / 1000000)) MB"
[ "$size" -le 250000000 ] || fail "the tool package is $size bytes; public feeds take at most 250 MB"

dotnet tool install --tool-path "$work/tool" --add-source "$work/feed" --version "$version" VlmTune.Cli >/dev/null
"$work/tool/vlmtune" --help >"$work/help.txt"
grep -q '^  vlmtune \[command\] \[options\]$' "$work/help.txt" || fail "the installed tool's help does not name it vlmtune: $(cat "$work/help.txt")"
# SkiaSharp's natives (images decoded) and the tokenizer, then libtorch's (a greedy answer of the tiny model).
"$work/tool/vlmtune" data validate --data configs/data/tiny_sft.jsonl --image-root "$fixtures/tiny-internvl2/images" \
  --model "$fixtures/tiny-internvl2/model" --json >/dev/null || fail "the installed tool failed: vlmtune data validate"
"$work/tool/vlmtune" chat --model "$fixtures/tiny-internvl2/model" --image "$fixtures/tiny-internvl2/images/clot.jpg" \
  --prompt "hello" --max-new-tokens 4 --json >"$work/chat.json" || fail "the installed tool failed: vlmtune chat"
grep -q '"token_ids":\[[0-9]' "$work/chat.json" || fail "vlmtune chat generated nothing: $(cat "$work/chat.json")"
# plot draws with ScottPlot, whose HarfBuzz natives must be in the package too.
mkdir -p "$work/run/vis_data"
printf '{"lr": 0.001, "loss": 2.5, "iter": 1, "step": 1, "grad_norm": 1.0, "tokens_per_s": 100}\n{"lr": 0.001, "loss": 2.0, "iter": 2, "step": 2, "grad_norm": 0.9, "tokens_per_s": 110}\n' >"$work/run/vis_data/scalars.json"
"$work/tool/vlmtune" plot "$work/run" -o "$work/curves.png" >/dev/null || fail "the installed tool failed: vlmtune plot"
[ -s "$work/curves.png" ] || fail "vlmtune plot wrote no PNG"

mkdir "$work/app"
cat >"$work/app/nuget.config" <<XML
<configuration><packageSources><add key="packed" value="$work/feed" /></packageSources></configuration>
XML
cat >"$work/app/app.csproj" <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup><OutputType>Exe</OutputType><TargetFramework>net10.0</TargetFramework><ImplicitUsings>enable</ImplicitUsings></PropertyGroup>
  <ItemGroup><PackageReference Include="VlmTune" Version="$version" /></ItemGroup>
</Project>
XML
cat >"$work/app/Program.cs" <<'CS'
using VlmTune.Inference;
using var chat = InternVLChat.Load(args[0], new ChatLoadOptions { Device = "cpu" });
var reply = chat.Chat(new ChatRequest { Question = "hello", Sampling = new SamplingOptions { MaxNewTokens = 4 } });
Console.WriteLine($"tokens {reply.TokenIds.Count}");
CS
dotnet build "$work/app" -c Release -v q -nologo >"$work/app-build.log" || { cat "$work/app-build.log"; fail "a console app referencing the VlmTune package does not build"; }
dotnet "$work/app/bin/Release/net10.0/app.dll" "$fixtures/tiny-internvl2/model" | grep -qx 'tokens 4' \
  || fail "a console app referencing the VlmTune package cannot run the tiny model"
echo "check-packages: the installed vlmtune tool and a console app on the VlmTune package work"
