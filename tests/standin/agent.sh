#!/bin/sh
# Stand-in agent for tests: a tiny chat loop that keeps its conversation in ~/.standin
# and shows the earlier turns when started with --resume.
STATE="$HOME/.standin"
mkdir -p "$STATE"
LOG="$STATE/conversation.log"
if [ "$1" = "--resume" ] && [ -f "$LOG" ]; then
    echo "resumed conversation:"
    sed 's/^/  earlier: /' "$LOG"
fi
echo "standin agent ready"
while printf 'standin> ' && read -r line; do
    case "$line" in
        /exit) echo "bye"; exit 0 ;;
    esac
    echo "$line" >> "$LOG"
    echo "echo: $line"
done
