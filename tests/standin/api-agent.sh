#!/bin/sh
# Stand-in agent for the credential broker's tests: it calls its model API as a real tool
# does, at the base URL and with the token coi put in its environment (STANDIN_API_URL,
# STANDIN_API_TOKEN). `/call` sends one request and prints the answer; `/exit` ends it.
echo "standin-api agent ready"
while printf 'api> ' && read -r line; do
    case "$line" in
        /exit) echo "bye"; exit 0 ;;
        /call)
            if out=$(wget -q -O - --header "x-api-key: $STANDIN_API_TOKEN" \
                    --header "content-type: application/json" \
                    --post-data '{"model":"m","max_tokens":1}' \
                    "$STANDIN_API_URL/v1/messages" 2>&1); then
                echo "call: ok $out"
            else
                echo "call: failed $out"
            fi ;;
        *) echo "echo: $line" ;;
    esac
done
