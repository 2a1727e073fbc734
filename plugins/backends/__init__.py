"""Built-in plugins of avatar-sdk, each registered through the avatar.plugins entry-point group."""
