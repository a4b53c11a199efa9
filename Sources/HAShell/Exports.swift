// The shell re-exports the pure vocabulary, so `import HAShell` is all an I/O file needs.
@_exported import HACore
