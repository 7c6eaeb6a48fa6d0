"""Google gemini-cli."""

from coi.tools.base import Broker, Install, Tool

TOOL = Tool(
    name="gemini",
    binary="gemini",
    state_dir=".gemini",
    bypass_args=("--yolo",),
    credential_files=(".gemini/settings.json", ".gemini/oauth_creds.json"),
    env_keys=("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    secret_files=(".gemini/oauth_creds.json",),
    # An API key (GEMINI_API_KEY) against the Gemini API, whose base URL the Google GenAI SDK
    # takes from GOOGLE_GEMINI_BASE_URL. A Google login (oauth_creds.json, the Code Assist
    # API) is not brokered.
    brokers=(
        Broker(
            provider="gemini",
            env={"GOOGLE_GEMINI_BASE_URL": "{url}", "GEMINI_API_KEY": "{token}"},
            settings={
                ".gemini/settings.json": {"security": {"auth": {"selectedType": "gemini-api-key"}}}
            },
        ),
    ),
    context_file=".gemini/GEMINI.md",
    description="Google gemini-cli",
    install=Install(npm="@google/gemini-cli"),
)
