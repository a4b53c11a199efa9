// swift-tools-version:6.0
import PackageDescription

// Module rule (docs/architecture.md, "Modules"): the pure targets (HACore, Quorum,
// Replication) hold the vocabulary and the cores; they may depend on each other, on NIOCore
// (ByteBuffer) and on Crypto (frame MAC, metadata checksums) and nothing else. Everything
// that touches the OS (sockets, files, clocks of the daemon, journald, TOML, Foundation)
// lives in the shell targets. scripts/check-purity.sh enforces it in CI.
//
// The pure targets compile in Swift 6 language mode. The shells stay in mode 5: they confine
// mutable state to one NIO event loop or queue each, and strict-concurrency annotations on
// every NIO handler would cost more than they catch (docs/architecture.md, "Concurrency").
let nioCore = Target.Dependency.product(name: "NIOCore", package: "swift-nio")
let nioPosix = Target.Dependency.product(name: "NIOPosix", package: "swift-nio")
let nioLocks = Target.Dependency.product(name: "NIOConcurrencyHelpers", package: "swift-nio")
let crypto = Target.Dependency.product(name: "Crypto", package: "swift-crypto")
let nioSSL = Target.Dependency.product(name: "NIOSSL", package: "swift-nio-ssl")
let nioTLS = Target.Dependency.product(name: "NIOTLS", package: "swift-nio")
let logging = Target.Dependency.product(name: "Logging", package: "swift-log")
let argumentParser = Target.Dependency.product(name: "ArgumentParser", package: "swift-argument-parser")
let pure: [SwiftSetting] = [.swiftLanguageMode(.v6)]

let package = Package(
    name: "hamgr",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "hamgr", targets: ["hamgr"]),
        .executable(name: "hactl", targets: ["hactl"]),
        .executable(name: "hamgr-sim", targets: ["hamgr-sim"]),
        .library(name: "HACore", targets: ["HACore"]),
        .library(name: "HAShell", targets: ["HAShell"]),
        .library(name: "Quorum", targets: ["Quorum"]),
        .library(name: "Replication", targets: ["Replication"]),
        .library(name: "ReplicationShell", targets: ["ReplicationShell"]),
        .library(name: "HamgrKit", targets: ["HamgrKit"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        // Pure: vocabulary and cores.
        .target(name: "HACore", dependencies: [nioCore, crypto], swiftSettings: pure),
        .target(name: "Quorum", dependencies: ["HACore"], swiftSettings: pure),
        .target(name: "Replication", dependencies: ["HACore", nioCore, crypto], swiftSettings: pure),

        // Shells: I/O.
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        .target(name: "HAShell", dependencies: [
            "HACore", "CSystemd", nioCore, nioPosix, nioLocks, logging, crypto, nioSSL, nioTLS,
            .product(name: "TOMLKit", package: "TOMLKit"),
        ]),
        .target(name: "ReplicationShell", dependencies: [
            "Replication", "HAShell", nioCore, nioPosix, nioLocks, logging, crypto, nioSSL, nioTLS,
        ]),
        // The one runtime of a node (quorum core + replicated volume + policies), shared by
        // the daemon and the whole-node simulator. Pure: it reaches the world only through
        // the NodeHost / ArbitratorHost protocols.
        .target(name: "NodeRuntime", dependencies: ["HACore", "Quorum", "Replication"], swiftSettings: pure),
        // The whole-node simulator (issue 9): both data nodes (NodeRuntime + ReplicationCore)
        // and the arbitrator on a simulated network, disks and clocks, from one seed. Pure.
        .target(name: "Simulation", dependencies: ["HACore", "Quorum", "Replication", "NodeRuntime", nioCore], swiftSettings: pure),
        .executableTarget(name: "hamgr-sim", dependencies: ["Simulation"], swiftSettings: pure),
        .target(name: "HamgrKit", dependencies: [
            "HAShell", "Quorum", "Replication", "ReplicationShell", "NodeRuntime", "CSystemd",
            nioCore, nioPosix, nioLocks, logging, crypto, nioSSL, nioTLS, argumentParser,
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        .executableTarget(name: "hamgr", dependencies: ["HamgrKit"]),
        .executableTarget(name: "hactl", dependencies: [
            "HAShell", "Replication", "ReplicationShell", crypto, nioSSL, argumentParser,
        ]),

        .testTarget(name: "HACoreTests", dependencies: ["HACore", "HAShell", nioCore, nioPosix, nioLocks, crypto,
                                                       .product(name: "NIOEmbedded", package: "swift-nio")]),
        .testTarget(name: "QuorumTests", dependencies: ["Quorum", "HACore"]),
        .testTarget(name: "ReplicationTests", dependencies: [
            "Replication", "ReplicationShell", "HACore", "HAShell", nioCore, nioPosix, nioLocks, logging, crypto,
        ]),
        .testTarget(name: "IntegrationTests", dependencies: [
            "HamgrKit", "HAShell", "Quorum", "Replication", "ReplicationShell", nioCore, nioPosix, nioLocks, logging, crypto
        ]),
        .testTarget(name: "SimulationTests", dependencies: ["Simulation", "HACore", "Quorum", "Replication"]),
    ],
    swiftLanguageModes: [.v5]
)
