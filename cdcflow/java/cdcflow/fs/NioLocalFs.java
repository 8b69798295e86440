package cdcflow.fs;

import java.io.IOException;
import java.net.URI;
import java.net.URISyntaxException;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.DelegateToFileSystem;
import org.apache.hadoop.fs.FsConstants;

/** The FileContext (AbstractFileSystem) side of NioLocalFileSystem, as Hadoop's RawLocalFs is for RawLocalFileSystem. */
public class NioLocalFs extends DelegateToFileSystem {
  public NioLocalFs(URI uri, Configuration conf) throws IOException, URISyntaxException {
    super(uri, new NioLocalFileSystem(), conf, FsConstants.LOCAL_FS_URI.getScheme(), false);
  }

  @Override
  public int getUriDefaultPort() {
    return -1;
  }

  @Override
  public boolean isValidName(String src) {
    return true;  // any local path (as Hadoop's RawLocalFs)
  }
}
