// swift-tools-version:6.0
import PackageDescription

// Language mode 5: the cores are value types and the shells confine mutable state to
// one NIO event loop each; strict-concurrency annotations on every NIO handler would
// cost more than they catch here. See docs/architecture.md ("Concurrency").
let package = Package(
    name: "hamgr",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "hamgr", targets: ["hamgr"]),
        .executable(name: "hactl", targets: ["hactl"]),
        .executable(name: "hamgr-sim", targets: ["hamgr-sim"]),
        .library(name: "HACore", targets: ["HACore"]),
        .library(name: "Quorum", targets: ["Quorum"]),
        .library(name: "Replication", targets: ["Replication"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto", from: "3.12.3"),
        .package(url: "https://github.com/LebJe/TOMLKit", from: "0.6.0"),
    ],
    targets: [
        .systemLibrary(name: "CSystemd", pkgConfig: "libsystemd", providers: [.apt(["libsystemd-dev"])]),
        .target(name: "HACore", dependencies: [
            "CSystemd",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "TOMLKit", package: "TOMLKit"),
        ]),
        .target(name: "Quorum", dependencies: ["HACore"]),
        .target(name: "Replication", dependencies: [
            "HACore",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        // The one runtime of a node (quorum core + replicated volume + policies), shared by
        // the daemon and the whole-node simulator. Pure: it reaches the world only through
        // the NodeHost / ArbitratorHost protocols.
        .target(name: "NodeRuntime", dependencies: ["HACore", "Quorum", "Replication"],
                swiftSettings: [.swiftLanguageMode(.v6)]),
        // The whole-node simulator (issue 9): both data nodes (NodeRuntime + ReplicationCore)
        // and the arbitrator on a simulated network, disks and clocks, from one seed. Pure.
        .target(name: "Simulation", dependencies: [
            "HACore", "Quorum", "Replication", "NodeRuntime",
            .product(name: "NIOCore", package: "swift-nio"),
        ], swiftSettings: [.swiftLanguageMode(.v6)]),
        .executableTarget(name: "hamgr-sim", dependencies: ["Simulation"],
                          swiftSettings: [.swiftLanguageMode(.v6)]),
        .executableTarget(name: "hamgr", dependencies: [
            "HACore", "Quorum", "Replication", "NodeRuntime",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
        ]),
        .executableTarget(name: "hactl", dependencies: [
            "HACore", "Replication",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "HACoreTests", dependencies: ["HACore", .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                                                       .product(name: "NIOPosix", package: "swift-nio")]),
        .testTarget(name: "QuorumTests", dependencies: ["Quorum", "HACore"]),
        .testTarget(name: "ReplicationTests", dependencies: [
            "Replication", "HACore",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "SimulationTests", dependencies: ["Simulation", "HACore", "Quorum", "Replication"]),
        .testTarget(name: "IntegrationTests", dependencies: ["HACore", "Replication", "hamgr"],
                    swiftSettings: [.define("HAMGR_TESTABLE")]),
    ],
    swiftLanguageModes: [.v5]
)
