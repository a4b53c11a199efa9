// The hamgr executable: everything else lives in HamgrKit, so the tests can link it.
import HamgrKit

tuneMallocForLargeBuffers()
Hamgr.main()
